-- Check-and-reserve for a batch of requests, decided one after another, each atomically over
-- every scope it is checked against; a refused request takes nothing. Rate limits are timed by
-- Redis's own clock; budget periods are the UTC day and month the replica names (yyyymmdd,
-- yyyymm). The same rules as rust/core/src/quota/local.rs.
--
-- KEYS: 2 per distinct scope in the batch: its state hash and its lease sorted set.
-- ARGV: lease ms, day id, month id, ms until the day ends, ms until the month ends, request
--   count, then per request: request id, scope count, then 11 per scope: the scope's position
--   in KEYS (1-based pair), then requests_per_minute, tokens_per_minute, max_concurrent,
--   token_budget, money_budget (-1 = no limit), tokens taken from the tokens-per-minute bucket,
--   the worst case tokens and money held against the scope's budgets (0 for a budget it does
--   not have), budget period (0 day, 1 month), and the hold's record (below). Every number is
--   an integer of at most 2^53, where doubles are exact; limits are below it.
--
-- State hash fields: rq, tk (GCRA theoretical arrival times, microseconds); ht, hm (tokens and
-- money held); d, dt, dm and mo, mt, mm (the day and month last charged, and the tokens and money
-- spent in each); pz (ms before which expired leases are not looked for); ex (ms of the last
-- expiry refresh); h:<request id> = "tokens money rate_tokens" of each live hold, or "x" once its
-- lease expired and admission released it. Every hold has a lease (member = request id, score =
-- expiry ms), which is also its concurrency slot: the hold of a replica that died is released
-- when its lease expires.
--
-- Reply: now (µs), then per request: 1 admitted or 0 refused, the refusing scope's position
-- among the request's scopes (0 if admitted), reason (1 concurrency, 2 requests, 3 tokens,
-- 4 token budget, 5 money budget), retry after (ms), what was left of the refusing budget
-- (0 otherwise), then each of its scopes' rq and tk after the decision, from which the replica
-- derives the x-ratelimit-* headers.
--
-- A `redis.call` and a number-to-string conversion each cost about as much as the arithmetic of
-- a whole request: each scope is read with one HMGET and written with one HSET and one ZADD
-- however many requests of the batch touch it, and numbers are written with '%d' (Lua's default
-- keeps 14 digits, too few for µs).

local WINDOW = 60000000
local KEEP_MS = 40 * 86400000
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local now_ms = math.floor(now / 1000)
local lease_ms = tonumber(ARGV[1])
local day_id, month_id = ARGV[2], ARGV[3]
local period_left = {[0] = tonumber(ARGV[4]), [1] = tonumber(ARGV[5])}
local purge_every = math.min(1000, lease_ms)
local lease_until = string.format('%d', now_ms + lease_ms)

local function num(value)
  return tonumber(value) or 0
end

-- Releases the holds of expired leases.
local function purge(k, s)
  local state, leases = KEYS[k * 2 - 1], KEYS[k * 2]
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now_ms)
  for _, member in ipairs(expired) do
    local hold = redis.call('HGET', state, 'h:' .. member)
    if hold and hold ~= 'x' then
      local tokens, money = string.match(hold, '^(%d+) (%d+)')
      s.ht = s.ht - tonumber(tokens)
      s.hm = s.hm - tonumber(money)
      -- Released, but its settlement must still charge what it used: leave a marker.
      redis.call('HSET', state, 'h:' .. member, 'x')
    end
  end
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now_ms)
  end
  s.pz = now_ms + purge_every
  s.dirty = true
end

local scopes = {}
local function load(k)
  local s = scopes[k]
  if s then
    return s
  end
  local f = redis.call('HMGET', KEYS[k * 2 - 1], 'rq', 'tk', 'ht', 'hm', 'pz', 'ex', 'd', 'dt',
    'dm', 'mo', 'mt', 'mm')
  s = {rq = num(f[1]), tk = num(f[2]), ht = num(f[3]), hm = num(f[4]), pz = num(f[5]),
    ex = num(f[6]), day = {0, 0}, month = {0, 0}, holds = {}, leases = {}, dirty = false}
  if f[7] == day_id then s.day = {num(f[8]), num(f[9])} end
  if f[10] == month_id then s.month = {num(f[11]), num(f[12])} end
  if now_ms >= s.pz then
    purge(k, s)
  end
  scopes[k] = s
  return s
end

local function inflight(k, s)
  if not s.inflight then
    s.inflight = redis.call('ZCARD', KEYS[k * 2])
  end
  return s.inflight
end

-- What is left of `budget` after `spent` and `held`, never below 0.
local function left(budget, spent, held)
  return math.max(budget - spent - held, 0)
end

-- The first limit of scope `s` that the request breaks: reason, retry after (ms) and, for a
-- budget, what was left of it.
local function check(k, s, a)
  if a.conc >= 0 and inflight(k, s) >= a.conc then
    return 1, 1000, 0
  end
  if a.rpm >= 0 then
    a.rq = math.max(s.rq, now) + WINDOW / a.rpm
    if a.rq - now > WINDOW then
      return 2, math.ceil((a.rq - now - WINDOW) / 1000), 0
    end
  end
  if a.tpm >= 0 then
    a.tk = math.max(s.tk, now) + a.rate * WINDOW / a.tpm
    if a.tk - now > WINDOW then
      return 3, math.ceil((a.tk - now - WINDOW) / 1000), 0
    end
  end
  -- Admitted only while its worst case fits in what is neither spent nor held: every admitted
  -- request holds its worst case, so together they never spend past the budget.
  local spent = a.period == 0 and s.day or s.month
  if a.token_budget >= 0 then
    local rest = left(a.token_budget, spent[1], s.ht)
    if a.hold_tokens > rest then
      return 4, period_left[a.period], rest
    end
  end
  if a.money_budget >= 0 then
    local rest = left(a.money_budget, spent[2], s.hm)
    if a.hold_money > rest then
      return 5, period_left[a.period], rest
    end
  end
  return nil
end

local reply, r = {now}, 1
local p = 7
for _ = 1, tonumber(ARGV[6]) do
  local id = ARGV[p]
  local field = 'h:' .. id
  local n = tonumber(ARGV[p + 1])
  p = p + 2
  local checks = {}
  for i = 1, n do
    checks[i] = {
      k = tonumber(ARGV[p]), rpm = tonumber(ARGV[p + 1]), tpm = tonumber(ARGV[p + 2]),
      conc = tonumber(ARGV[p + 3]), token_budget = tonumber(ARGV[p + 4]),
      money_budget = tonumber(ARGV[p + 5]), rate = tonumber(ARGV[p + 6]),
      hold_tokens = tonumber(ARGV[p + 7]), hold_money = tonumber(ARGV[p + 8]),
      period = tonumber(ARGV[p + 9]),
      record = ARGV[p + 10],
    }
    p = p + 11
  end
  local refused, reason, retry, rest = 0, 0, 0, 0
  for i = 1, n do
    local a = checks[i]
    local r, wait, budget_left = check(a.k, load(a.k), a)
    if r then
      refused, reason, retry, rest = i, r, wait, budget_left
      break
    end
  end
  if refused == 0 then
    for i = 1, n do
      local a = checks[i]
      local s = scopes[a.k]
      if a.rq then s.rq = a.rq end
      if a.tk then s.tk = a.tk end
      s.ht = s.ht + a.hold_tokens
      s.hm = s.hm + a.hold_money
      if s.inflight then s.inflight = s.inflight + 1 end
      local holds, leases = s.holds, s.leases
      holds[#holds + 1] = field
      holds[#holds + 1] = a.record
      leases[#leases + 1] = lease_until
      leases[#leases + 1] = id
      s.dirty = true
    end
  end
  reply[r + 1], reply[r + 2], reply[r + 3], reply[r + 4], reply[r + 5] =
    refused == 0 and 1 or 0, refused, reason, retry, rest
  r = r + 5
  for i = 1, n do
    local s = load(checks[i].k)
    reply[r + 1], reply[r + 2] = math.floor(s.rq), math.floor(s.tk)
    r = r + 2
  end
end

for k, s in pairs(scopes) do
  if s.dirty then
    local state, leases = KEYS[k * 2 - 1], KEYS[k * 2]
    local update = s.holds
    for _, v in ipairs({'rq', string.format('%d', s.rq), 'tk', string.format('%d', s.tk),
        'ht', string.format('%d', s.ht), 'hm', string.format('%d', s.hm),
        'pz', string.format('%d', s.pz)}) do
      table.insert(update, v)
    end
    -- Expiries are refreshed once a minute: the state outlives the longest budget period, the
    -- lease set its longest lease.
    local refresh = now_ms - s.ex > 60000
    if refresh then
      table.insert(update, 'ex')
      table.insert(update, string.format('%d', now_ms))
    end
    redis.call('HSET', state, unpack(update))
    if #s.leases > 0 then
      redis.call('ZADD', leases, unpack(s.leases))
    end
    if refresh then
      redis.call('PEXPIRE', state, KEEP_MS)
      redis.call('PEXPIRE', leases, lease_ms + 120000)
    end
  end
end
return reply
