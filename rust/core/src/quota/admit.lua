-- Check-and-reserve for one request against every scope it is checked against, atomically,
-- timed by Redis's own clock. The same rules as rust/core/src/quota/local.rs.
--
-- KEYS, 3 per scope: the scope's state hash, its lease sorted set, its spent hash for the
--   current budget period.
-- ARGV: request id, lease ms, scope count, then 8 per scope: requests_per_minute,
--   tokens_per_minute, max_concurrent, token_budget, money_budget (-1 = no limit), tokens taken
--   from the tokens-per-minute bucket, tokens and money held against budgets, then one more per
--   scope: ms until its budget period ends.
--
-- State hash fields: rq, tk (GCRA theoretical arrival times, microseconds), ht, hm (tokens and
-- money held), h:<request id> = "tokens money rate_tokens" of each live hold, or "x" once its
-- lease expired and it was released here. A lease (member = request id, score = expiry ms) is a
-- concurrency slot.
--
-- Reply: {1, headers...} or {0, scope index (1-based), reason, retry after ms, headers...};
-- reasons 1 concurrency, 2 requests, 3 tokens, 4 token budget, 5 money budget; headers are
-- 6 numbers per scope: requests limit, remaining, reset ms, tokens limit, remaining, reset ms
-- (-1 when not limited).

-- Numbers reach Redis as text: negate as `0 - x`, since `-x` of zero is "-0", which HINCRBY
-- refuses.
local WINDOW = 60000000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
local id = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local n = tonumber(ARGV[3])

local function arg(scope, i)
  return tonumber(ARGV[3 + (scope - 1) * 9 + i])
end

local function purge(state, leases)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now_ms)
  for _, member in ipairs(expired) do
    local hold = redis.call('HGET', state, 'h:' .. member)
    if hold and hold ~= 'x' then
      local tokens, money = string.match(hold, '^(%d+) (%d+)')
      redis.call('HINCRBY', state, 'ht', 0 - tonumber(tokens))
      redis.call('HINCRBY', state, 'hm', 0 - tonumber(money))
      -- Released, but its settlement must still charge what it used: leave a marker.
      redis.call('HSET', state, 'h:' .. member, 'x')
    end
  end
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now_ms)
  end
end

local function field(key, name)
  return tonumber(redis.call('HGET', key, name) or '0') or 0
end

-- Microseconds ahead of now the bucket would be after taking cost, or nil if it cannot.
local function gcra(tat, limit, cost)
  local next = math.max(tat, now) + cost * WINDOW / limit
  return next, next - now
end

local function info(tat, limit)
  if limit < 0 then
    return -1, -1, -1
  end
  local used = math.max(tat - now, 0)
  local remaining = math.max(math.floor((WINDOW - used) * limit / WINDOW + 1e-6), 0)
  return limit, remaining, math.ceil(used / 1000)
end

local function headers(reply)
  for s = 1, n do
    local state = KEYS[(s - 1) * 3 + 1]
    local rq, tk = field(state, 'rq'), field(state, 'tk')
    local a, b, c = info(rq, arg(s, 1))
    local d, e, f = info(tk, arg(s, 2))
    for _, v in ipairs({a, b, c, d, e, f}) do
      table.insert(reply, v)
    end
  end
  return reply
end

-- Check every scope before taking from any.
for s = 1, n do
  local state, leases, spent = KEYS[(s - 1) * 3 + 1], KEYS[(s - 1) * 3 + 2], KEYS[(s - 1) * 3 + 3]
  purge(state, leases)
  local rpm, tpm, conc = arg(s, 1), arg(s, 2), arg(s, 3)
  local token_budget, money_budget = arg(s, 4), arg(s, 5)
  local refusal = nil
  if conc >= 0 and redis.call('ZCARD', leases) >= conc then
    refusal = {1, 1000}
  end
  if not refusal and rpm >= 0 then
    local _, ahead = gcra(field(state, 'rq'), rpm, 1)
    if ahead > WINDOW then refusal = {2, math.ceil((ahead - WINDOW) / 1000)} end
  end
  if not refusal and tpm >= 0 then
    local _, ahead = gcra(field(state, 'tk'), tpm, arg(s, 6))
    if ahead > WINDOW then refusal = {3, math.ceil((ahead - WINDOW) / 1000)} end
  end
  if not refusal and token_budget >= 0
      and field(spent, 't') + field(state, 'ht') >= token_budget then
    refusal = {4, arg(s, 9)}
  end
  if not refusal and money_budget >= 0
      and field(spent, 'm') + field(state, 'hm') >= money_budget then
    refusal = {5, arg(s, 9)}
  end
  if refusal then
    return headers({0, s, refusal[1], refusal[2]})
  end
end

for s = 1, n do
  local state, leases = KEYS[(s - 1) * 3 + 1], KEYS[(s - 1) * 3 + 2]
  local rpm, tpm = arg(s, 1), arg(s, 2)
  if rpm >= 0 then
    local next = gcra(field(state, 'rq'), rpm, 1)
    redis.call('HSET', state, 'rq', string.format('%.0f', next))
  end
  if tpm >= 0 then
    local next = gcra(field(state, 'tk'), tpm, arg(s, 6))
    redis.call('HSET', state, 'tk', string.format('%.0f', next))
  end
  local hold_tokens, hold_money = arg(s, 7), arg(s, 8)
  redis.call('HINCRBY', state, 'ht', hold_tokens)
  redis.call('HINCRBY', state, 'hm', hold_money)
  redis.call('HSET', state, 'h:' .. id,
    string.format('%d %d %d', hold_tokens, hold_money, arg(s, 6)))
  redis.call('ZADD', leases, now_ms + lease_ms, id)
  redis.call('PEXPIRE', state, lease_ms + 120000)
  redis.call('PEXPIRE', leases, lease_ms + 120000)
end
return headers({1})
