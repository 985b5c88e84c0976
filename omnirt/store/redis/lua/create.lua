--! include _retain.lua
--! include _append.lua
-- KEYS: hash, stream. ARGV: P, id, state, model, idem, owner, terminal, retention_ms, event, f1, v1, ...
local P, id, state, model, idem = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
local order = redis.call('INCR', P .. 'order')
local hook = nil
for i = 10, #ARGV, 2 do
  if ARGV[i] == '_hook' then hook = ARGV[i + 1] end
end
local seq = add_events(KEYS[1], KEYS[2], 0, hook, {ARGV[9]})
local fv = {'state', state, '_model', model, '_idem', idem, '_owner', ARGV[6], '_order', order, '_seq', seq}
for i = 10, #ARGV do fv[#fv + 1] = ARGV[i] end
if ARGV[7] == '1' then
  fv[#fv + 1] = '_expires_at_ms'
  fv[#fv + 1] = 0  -- set below, once the keys exist
end
redis.call('HSET', KEYS[1], unpack(fv))
redis.call('ZADD', P .. 'jobs', order, id)
redis.call('ZADD', P .. 'state:' .. state, order, id)
redis.call('ZADD', P .. 'model:' .. model, order, id)
if idem ~= '' then
  local ik = P .. 'idem:' .. idem
  local v = redis.call('GET', ik)
  if v and cjson.decode(v)[1] == id then redis.call('PERSIST', ik) end
end
if ARGV[7] == '1' then
  local deadline = retain(P, id, KEYS[1], KEYS[2], tonumber(ARGV[8]), idem, model, hook)
  redis.call('HSET', KEYS[1], '_expires_at_ms', deadline)
end
return order
