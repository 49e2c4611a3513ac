-- Settlement of one request: releases its holds and lease in every scope, charges its actual
-- tokens and money to the budget periods, and gives back to (or takes more from) each
-- tokens-per-minute bucket the difference between what it took and what was used.
--
-- KEYS, 4 per scope: state hash, lease sorted set, spent hash of the current day, of the
--   current month (see admit.lua).
-- ARGV: request id, scope count, actual tokens, actual money, ms until the day ends, ms until
--   the month ends, then 1 per scope: its tokens_per_minute (-1 = no limit).
-- Idempotent: it acts only on a hold record it finds, and deletes it. A hold whose lease expired
-- was released by admit.lua and left as "x": its usage is charged, nothing released twice.

-- Numbers reach Redis as text: negate as `0 - x`, since `-x` of zero is "-0", which HINCRBY
-- refuses.
local WINDOW = 60000000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local id = ARGV[1]
local n = tonumber(ARGV[2])
local tokens, money = tonumber(ARGV[3]), tonumber(ARGV[4])
local keep = {tonumber(ARGV[5]) + 86400000, tonumber(ARGV[6]) + 86400000}

for s = 1, n do
  local state, leases = KEYS[(s - 1) * 4 + 1], KEYS[(s - 1) * 4 + 2]
  local hold = redis.call('HGET', state, 'h:' .. id)
  if hold then
    redis.call('HDEL', state, 'h:' .. id)
    if hold ~= 'x' then
      local held_tokens, held_money, rate_tokens = string.match(hold, '^(%d+) (%d+) (%d+)')
      redis.call('HINCRBY', state, 'ht', 0 - tonumber(held_tokens))
      redis.call('HINCRBY', state, 'hm', 0 - tonumber(held_money))
      redis.call('ZREM', leases, id)
      local tpm = tonumber(ARGV[6 + s])
      if tpm >= 0 then
        local tat = tonumber(redis.call('HGET', state, 'tk') or '0') or 0
        local next = math.max(tat, now) + (tokens - tonumber(rate_tokens)) * WINDOW / tpm
        redis.call('HSET', state, 'tk', string.format('%.0f', math.max(next, now)))
      end
    end
    for p = 1, 2 do
      local spent = KEYS[(s - 1) * 4 + 2 + p]
      redis.call('HINCRBY', spent, 't', tokens)
      redis.call('HINCRBY', spent, 'm', money)
      redis.call('PEXPIRE', spent, keep[p])
    end
  end
end
return 1
