-- Check-and-reserve for one request against every scope it is checked against, atomically.
-- Rate limits are timed by Redis's own clock; budget periods are the UTC day and month the
-- replica names (yyyymmdd, yyyymm). The same rules as rust/core/src/quota/local.rs.
--
-- KEYS, 2 per scope: the scope's state hash and its lease sorted set.
-- ARGV: request id, lease ms, scope count, day id, month id, ms until the day ends, ms until the
--   month ends, the prompt's upper bound in tokens and its cost, then 9 per scope: requests_per_minute, tokens_per_minute, max_concurrent,
--   token_budget, money_budget (-1 = no limit), tokens taken from the tokens-per-minute bucket,
--   tokens and money held against budgets, budget period (0 day, 1 month).
--
-- State hash fields: rq, tk (GCRA theoretical arrival times, microseconds); ht, hm (tokens and
-- money held); d, dt, dm and mo, mt, mm (the day and month last charged, and the tokens and money
-- spent in each); pz (ms before which expired leases are not looked for); ex (ms of the last
-- expiry refresh); h:<request id> = "tokens money rate_tokens" of each live hold, or "x" once its
-- lease expired and admission released it. Every hold has a lease (member = request id, score =
-- expiry ms), which is also its concurrency slot: the hold of a replica that died is released
-- when its lease expires.
--
-- Reply: {1, now µs, then rq, tk per scope} or {0, scope index (1-based), reason, retry after ms,
-- now µs, then rq, tk per scope}; reasons 1 concurrency, 2 requests, 3 tokens, 4 token budget,
-- 5 money budget. The replica derives the x-ratelimit-* headers from the TATs.
--
-- A `redis.call` and a number-to-string conversion each cost about as much as the rest of a
-- scope's arithmetic: a scope is read with one HMGET, written with one HSET of the fields that
-- changed, and numbers are written with '%d' (Lua's default keeps 14 digits, too few for µs).

local WINDOW = 60000000
local KEEP_MS = 40 * 86400000
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local now_ms = math.floor(now / 1000)
local id = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local day_id, month_id = ARGV[4], ARGV[5]
local period_left = {[0] = tonumber(ARGV[6]), [1] = tonumber(ARGV[7])}
local prompt_tokens, prompt_money = tonumber(ARGV[8]), tonumber(ARGV[9])
local purge_every = math.min(1000, lease_ms)

local function num(value)
  return tonumber(value) or 0
end

-- Releases the holds of expired leases.
local function purge(state, leases, s)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now_ms)
  for _, member in ipairs(expired) do
    local hold = redis.call('HGET', state, 'h:' .. member)
    if hold and hold ~= 'x' then
      local tokens, money = string.match(hold, '^(%d+) (%d+)')
      s.ht = s.ht - tonumber(tokens)
      s.hm = s.hm - tonumber(money)
      s.held_changed = true
      -- Released, but its settlement must still charge what it used: leave a marker.
      redis.call('HSET', state, 'h:' .. member, 'x')
    end
  end
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now_ms)
  end
  s.pz = now_ms + purge_every
  s.purged = true
end

local scopes = {}
for i = 1, n do
  local base = 9 + (i - 1) * 9
  local state = KEYS[i * 2 - 1]
  local f = redis.call('HMGET', state, 'rq', 'tk', 'ht', 'hm', 'pz', 'ex', 'd', 'dt', 'dm',
    'mo', 'mt', 'mm')
  local s = {
    rpm = tonumber(ARGV[base + 1]), tpm = tonumber(ARGV[base + 2]),
    conc = tonumber(ARGV[base + 3]), token_budget = tonumber(ARGV[base + 4]),
    money_budget = tonumber(ARGV[base + 5]), rate = tonumber(ARGV[base + 6]),
    hold_tokens = ARGV[base + 7], hold_money = ARGV[base + 8], period = tonumber(ARGV[base + 9]),
    rq = num(f[1]), tk = num(f[2]), ht = num(f[3]), hm = num(f[4]), pz = num(f[5]),
    ex = num(f[6]), spent_t = 0, spent_m = 0,
  }
  if s.period == 0 and f[7] == day_id then
    s.spent_t, s.spent_m = num(f[8]), num(f[9])
  elseif s.period == 1 and f[10] == month_id then
    s.spent_t, s.spent_m = num(f[11]), num(f[12])
  end
  if now_ms >= s.pz then
    purge(state, KEYS[i * 2], s)
  end
  scopes[i] = s
end

local function reply(head)
  table.insert(head, now)
  for i = 1, n do
    table.insert(head, scopes[i].rq)
    table.insert(head, scopes[i].tk)
  end
  return head
end

-- Check every scope before taking from any.
for i = 1, n do
  local s = scopes[i]
  local refusal = nil
  if s.conc >= 0 and redis.call('ZCARD', KEYS[i * 2]) >= s.conc then
    refusal = {1, 1000}
  end
  if not refusal and s.rpm >= 0 then
    s.rq_next = math.max(s.rq, now) + WINDOW / s.rpm
    if s.rq_next - now > WINDOW then
      refusal = {2, math.ceil((s.rq_next - now - WINDOW) / 1000)}
    end
  end
  if not refusal and s.tpm >= 0 then
    s.tk_next = math.max(s.tk, now) + s.rate * WINDOW / s.tpm
    if s.tk_next - now > WINDOW then
      refusal = {3, math.ceil((s.tk_next - now - WINDOW) / 1000)}
    end
  end
  -- Admitted while the prompt fits in what is neither spent nor held: each admitted request
  -- holds its worst case, so the last one overshoots by at most its completion.
  if not refusal and s.token_budget >= 0
      and s.spent_t + s.ht + prompt_tokens > s.token_budget then
    refusal = {4, period_left[s.period]}
  end
  if not refusal and s.money_budget >= 0
      and s.spent_m + s.hm + prompt_money > s.money_budget then
    refusal = {5, period_left[s.period]}
  end
  if refusal then
    for j = 1, n do
      local sj = scopes[j]
      if sj.purged then
        redis.call('HSET', KEYS[j * 2 - 1], 'ht', string.format('%d', sj.ht),
          'hm', string.format('%d', sj.hm), 'pz', string.format('%d', sj.pz))
      end
    end
    return reply({0, i, refusal[1], refusal[2]})
  end
end

for i = 1, n do
  local s, state, leases = scopes[i], KEYS[i * 2 - 1], KEYS[i * 2]
  local update = {'h:' .. id, s.hold_tokens .. ' ' .. s.hold_money .. ' ' .. s.rate}
  if s.rq_next then
    s.rq = s.rq_next
    table.insert(update, 'rq')
    table.insert(update, string.format('%d', s.rq))
  end
  if s.tk_next then
    s.tk = s.tk_next
    table.insert(update, 'tk')
    table.insert(update, string.format('%d', s.tk))
  end
  if s.hold_tokens ~= '0' or s.hold_money ~= '0' or s.held_changed then
    table.insert(update, 'ht')
    table.insert(update, string.format('%d', s.ht + s.hold_tokens))
    table.insert(update, 'hm')
    table.insert(update, string.format('%d', s.hm + s.hold_money))
  end
  if s.purged then
    table.insert(update, 'pz')
    table.insert(update, string.format('%d', s.pz))
  end
  -- Expiries are refreshed once a minute: the state outlives the longest budget period, the
  -- lease set its longest lease.
  local refresh = now_ms - s.ex > 60000
  if refresh then
    table.insert(update, 'ex')
    table.insert(update, string.format('%d', now_ms))
  end
  redis.call('HSET', state, unpack(update))
  redis.call('ZADD', leases, now_ms + lease_ms, id)
  if refresh then
    redis.call('PEXPIRE', state, KEEP_MS)
    redis.call('PEXPIRE', leases, lease_ms + 120000)
  end
end
return reply({1})
