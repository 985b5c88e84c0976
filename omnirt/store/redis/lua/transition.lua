--! include _retain.lua
--! include _append.lua
-- KEYS: hash, stream. ARGV: P, id, ",expected,", target, ",allowed sources,", terminal,
-- retention_ms, event ('' = none), owner ('' = keep), n, d1, dv1 ... (n pairs: fields set only
-- where the job has none yet, e.g. started_at_ms), m, k1, a1 ... (m artifacts: key, payload, set
-- for retention_ms when the move applies: a terminal outcome and its outputs in one call), f1, v1, ...
-- Returns {1, hgetall} applied | {0, state} CAS lost | {-1, state} illegal | {-2} no such job.
local P, id, target = ARGV[1], ARGV[2], ARGV[4]
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return cjson.encode({-2}) end
if not string.find(ARGV[3], ',' .. cur .. ',', 1, true) then return cjson.encode({0, cur}) end
if not string.find(ARGV[5], ',' .. cur .. ',', 1, true) then return cjson.encode({-1, cur}) end
local fv = {'state', target}
local i = 10
local n = tonumber(ARGV[i])
for j = i + 1, i + 2 * n, 2 do
  local have = redis.call('HGET', KEYS[1], ARGV[j])
  if not have or have == 'null' then fv[#fv + 1] = ARGV[j]; fv[#fv + 1] = ARGV[j + 1] end
end
i = i + 2 * n + 1
local m = tonumber(ARGV[i])
for j = i + 1, i + 2 * m, 2 do redis.call('SET', ARGV[j], ARGV[j + 1], 'PX', ARGV[7]) end
i = i + 2 * m + 1
for j = i, #ARGV do fv[#fv + 1] = ARGV[j] end
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
