--! include _retain.lua
--! include _append.lua
-- KEYS: hash, stream. ARGV: P, id, ",expected,", target, ",allowed sources,", terminal,
-- retention_ms, event ('' = none), owner ('' = keep), n, d1, dv1 ... (n pairs: fields set only
-- where the job has none yet, e.g. started_at_ms), m, k1, a1 ... (m artifacts: key, payload, set
-- for retention_ms when the move applies: a terminal outcome and its outputs in one call),
-- attempt ('' = none), w, i1, e1 ... (w worker events of that attempt, appended before the move's
-- event as append_worker_batch does: each unless the attempt's event #index is stored, none once
-- the job is terminal, also when the move does not apply: a worker's last events and its outcome
-- in one call), f1, v1, ...
-- One read of the hash, one write. Returns {1, hgetall} applied | {0, state} CAS lost |
-- {-1, state} illegal | {-2} no such job.
local P, id, target = ARGV[1], ARGV[2], ARGV[4]
local n = tonumber(ARGV[10])
local i = 11 + 2 * n
local m = tonumber(ARGV[i])
local wa = i + 2 * m + 1
local w = tonumber(ARGV[wa + 1])
local names = {'state', '_seq', '_hook', '_order', '_idem', '_model'}
for j = 11, 10 + 2 * n, 2 do names[#names + 1] = ARGV[j] end
local wfield = nil
if ARGV[wa] ~= '' then
  wfield = '_w' .. ARGV[wa]
  names[#names + 1] = wfield
end
local v = redis.call('HMGET', KEYS[1], unpack(names))
local cur = v[1]
if not cur then return cjson.encode({-2}) end
local evs = {}
local have = 0
if wfield and cur ~= 'succeeded' and cur ~= 'failed' and cur ~= 'cancelled' then
  have = tonumber(v[#names] or '0')
  for j = wa + 2, wa + 1 + 2 * w, 2 do
    local index = tonumber(ARGV[j])
    if index > have then
      have = index
      evs[#evs + 1] = ARGV[j + 1]
    end
  end
end
local function refused(reply)
  if #evs > 0 then
    redis.call('HSET', KEYS[1], '_seq', add_events(KEYS[1], KEYS[2], tonumber(v[2] or '0'), v[3], evs), wfield, have)
  end
  return cjson.encode(reply)
end
if not string.find(ARGV[3], ',' .. cur .. ',', 1, true) then return refused({0, cur}) end
if not string.find(ARGV[5], ',' .. cur .. ',', 1, true) then return refused({-1, cur}) end
local fv = {'state', target}
for k = 1, n do
  local have = v[6 + k]
  if not have or have == 'null' then
    fv[#fv + 1] = ARGV[9 + 2 * k]
    fv[#fv + 1] = ARGV[10 + 2 * k]
  end
end
for j = i + 1, i + 2 * m, 2 do redis.call('SET', ARGV[j], ARGV[j + 1], 'PX', ARGV[7]) end
for j = wa + 2 + 2 * w, #ARGV do fv[#fv + 1] = ARGV[j] end
if ARGV[9] ~= '' then fv[#fv + 1] = '_owner'; fv[#fv + 1] = ARGV[9] end
if #evs > 0 then fv[#fv + 1] = wfield; fv[#fv + 1] = have end
if ARGV[8] ~= '' then evs[#evs + 1] = ARGV[8] end
if #evs > 0 then
  fv[#fv + 1] = '_seq'
  fv[#fv + 1] = add_events(KEYS[1], KEYS[2], tonumber(v[2] or '0'), v[3], evs)
end
if ARGV[6] == '1' then
  fv[#fv + 1] = '_expires_at_ms'
  fv[#fv + 1] = retain(P, id, KEYS[1], KEYS[2], tonumber(ARGV[7]), v[5], v[6], v[3])
end
redis.call('HSET', KEYS[1], unpack(fv))
if cur ~= target then
  redis.call('ZREM', P .. 'state:' .. cur, id)
  redis.call('ZADD', P .. 'state:' .. target, v[4], id)
end
return cjson.encode({1, redis.call('HGETALL', KEYS[1])})
