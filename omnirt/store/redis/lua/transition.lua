--! include _retain.lua
--! include _append.lua
-- KEYS: hash, stream. ARGV: P, id, ",expected,", target, ",allowed sources,", terminal,
-- retention_ms, event ('' = none), owner ('' = keep), f1, v1, ...
-- Returns {1, hgetall} applied | {0, state} CAS lost | {-1, state} illegal | {-2} no such job.
local P, id, target = ARGV[1], ARGV[2], ARGV[4]
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return cjson.encode({-2}) end
if not string.find(ARGV[3], ',' .. cur .. ',', 1, true) then return cjson.encode({0, cur}) end
if not string.find(ARGV[5], ',' .. cur .. ',', 1, true) then return cjson.encode({-1, cur}) end
local fv = {'state', target}
for i = 10, #ARGV do fv[#fv + 1] = ARGV[i] end
if ARGV[9] ~= '' then fv[#fv + 1] = '_owner'; fv[#fv + 1] = ARGV[9] end
redis.call('HSET', KEYS[1], unpack(fv))
if cur ~= target then
  local order = redis.call('HGET', KEYS[1], '_order')
  redis.call('ZREM', P .. 'state:' .. cur, id)
  redis.call('ZADD', P .. 'state:' .. target, order, id)
end
if ARGV[8] ~= '' then append(KEYS[1], KEYS[2], ARGV[8]) end
if ARGV[6] == '1' then retain(P, id, KEYS[1], KEYS[2], tonumber(ARGV[7])) end
return cjson.encode({1, redis.call('HGETALL', KEYS[1])})
