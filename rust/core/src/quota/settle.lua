-- Settlement of a batch of requests, one after another: each releases its holds and leases in
-- every scope, charges its actual tokens and money to the day and month the replica names, and
-- gives back to (or takes more from) each tokens-per-minute bucket the difference between what it
-- took and what it used.
--
-- KEYS: 2 per distinct scope in the batch: state hash and lease sorted set (see admit.lua).
-- ARGV: day id, month id, settlement count, then per settlement: request id, actual tokens,
--   actual money, scope count, then 2 per scope: the scope's position in KEYS (1-based pair) and
--   its tokens_per_minute (-1 = no limit).
-- Idempotent: a settlement acts only on a hold record it finds, and deletes it. A hold whose
-- lease expired was released by admit.lua and left as "x": its usage is charged, nothing
-- released twice. Each scope is read with one HMGET and written with one HSET, one HDEL and one
-- ZREM, however many settlements touch it.

local WINDOW = 60000000
-- Spent figures stop at 2^53 (every count the replica sends is at most that): past it doubles
-- are no longer exact, and every budget is below it anyway.
local CAP = 9007199254740992
local day_id, month_id = ARGV[1], ARGV[2]
local now = nil

local function num(value)
  return tonumber(value) or 0
end

-- Parse the batch, and gather each scope's request ids.
local settlements = {}
local ids = {}
local p = 4
for i = 1, tonumber(ARGV[3]) do
  local st = {id = ARGV[p], field = 'h:' .. ARGV[p], tokens = tonumber(ARGV[p + 1]),
    money = tonumber(ARGV[p + 2]), scopes = {}}
  local n = tonumber(ARGV[p + 3])
  p = p + 4
  for j = 1, n do
    local k, tpm = tonumber(ARGV[p]), tonumber(ARGV[p + 1])
    st.scopes[j] = {k = k, tpm = tpm}
    ids[k] = ids[k] or {}
    table.insert(ids[k], st.field)
    p = p + 2
  end
  settlements[i] = st
end

local scopes = {}
for k, fields in pairs(ids) do
  local f = redis.call('HMGET', KEYS[k * 2 - 1], 'tk', 'ht', 'hm', 'd', 'dt', 'dm', 'mo', 'mt',
    'mm', unpack(fields))
  local s = {tk = num(f[1]), ht = num(f[2]), hm = num(f[3]), dt = 0, dm = 0, mt = 0, mm = 0,
    holds = {}, found = {}, released = {}}
  if f[4] == day_id then s.dt, s.dm = num(f[5]), num(f[6]) end
  if f[7] == month_id then s.mt, s.mm = num(f[8]), num(f[9]) end
  for j, field in ipairs(fields) do
    s.holds[field] = f[9 + j]
  end
  scopes[k] = s
end

for _, st in ipairs(settlements) do
  for _, sc in ipairs(st.scopes) do
    local s = scopes[sc.k]
    local field = st.field
    local hold = s.holds[field]
    if hold then
      s.holds[field] = nil
      table.insert(s.found, field)
      s.dt, s.dm = math.min(s.dt + st.tokens, CAP), math.min(s.dm + st.money, CAP)
      s.mt, s.mm = math.min(s.mt + st.tokens, CAP), math.min(s.mm + st.money, CAP)
      if hold ~= 'x' then
        local held_tokens, held_money, rate_tokens = string.match(hold, '^(%d+) (%d+) (%d+)')
        s.ht = s.ht - held_tokens
        s.hm = s.hm - held_money
        if sc.tpm >= 0 then
          if not now then
            local t = redis.call('TIME')
            now = t[1] * 1000000 + t[2]
          end
          s.tk = math.max(math.max(s.tk, now) + (st.tokens - rate_tokens) * WINDOW / sc.tpm, now)
        end
        table.insert(s.released, st.id)
      end
    end
  end
end

for k, s in pairs(scopes) do
  if #s.found > 0 then
    local state = KEYS[k * 2 - 1]
    redis.call('HSET', state, 'tk', string.format('%d', s.tk), 'ht', string.format('%d', s.ht),
      'hm', string.format('%d', s.hm), 'd', day_id, 'dt', string.format('%d', s.dt),
      'dm', string.format('%d', s.dm), 'mo', month_id, 'mt', string.format('%d', s.mt),
      'mm', string.format('%d', s.mm))
    redis.call('HDEL', state, unpack(s.found))
  end
  if #s.released > 0 then
    redis.call('ZREM', KEYS[k * 2], unpack(s.released))
  end
end
return 1
