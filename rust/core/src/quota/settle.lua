-- Settlement of one request: releases its holds and leases in every scope, charges its actual
-- tokens and money to the day and month the replica names, and gives back to (or takes more
-- from) each tokens-per-minute bucket the difference between what it took and what was used.
--
-- KEYS, 2 per scope: state hash and lease sorted set (see admit.lua for their fields).
-- ARGV: request id, scope count, actual tokens, actual money, day id, month id, then 1 per
--   scope: its tokens_per_minute (-1 = no limit).
-- Idempotent: it acts only on a hold record it finds, and deletes it. A hold whose lease expired
-- was released by admit.lua and left as "x": its usage is charged, nothing released twice.

local WINDOW = 60000000
local id = ARGV[1]
local n = tonumber(ARGV[2])
local tokens, money = tonumber(ARGV[3]), tonumber(ARGV[4])
local day_id, month_id = ARGV[5], ARGV[6]
local now = nil

local function num(value)
  return tonumber(value) or 0
end

for s = 1, n do
  local state, leases = KEYS[s * 2 - 1], KEYS[s * 2]
  local f = redis.call('HMGET', state, 'h:' .. id, 'tk', 'ht', 'hm', 'd', 'dt', 'dm', 'mo',
    'mt', 'mm')
  local hold = f[1]
  if hold then
    local dt, dm, mt, mm = 0, 0, 0, 0
    if f[5] == day_id then dt, dm = num(f[6]), num(f[7]) end
    if f[8] == month_id then mt, mm = num(f[9]), num(f[10]) end
    local update = {'d', day_id, 'dt', string.format('%d', dt + tokens),
      'dm', string.format('%d', dm + money), 'mo', month_id,
      'mt', string.format('%d', mt + tokens), 'mm', string.format('%d', mm + money)}
    if hold ~= 'x' then
      local held_tokens, held_money, rate_tokens = string.match(hold, '^(%d+) (%d+) (%d+)')
      local tpm = tonumber(ARGV[6 + s])
      if tpm >= 0 then
        if not now then
          local t = redis.call('TIME')
          now = t[1] * 1000000 + t[2]
        end
        local tk = math.max(num(f[2]), now) + (tokens - rate_tokens) * WINDOW / tpm
        table.insert(update, 'tk')
        table.insert(update, string.format('%d', math.max(tk, now)))
      end
      if held_tokens ~= '0' or held_money ~= '0' then
        table.insert(update, 'ht')
        table.insert(update, string.format('%d', num(f[3]) - held_tokens))
        table.insert(update, 'hm')
        table.insert(update, string.format('%d', num(f[4]) - held_money))
      end
      redis.call('ZREM', leases, id)
    end
    redis.call('HSET', state, unpack(update))
    redis.call('HDEL', state, 'h:' .. id)
  end
end
return 1
