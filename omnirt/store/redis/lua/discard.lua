-- KEYS: hash, stream. ARGV: P, id. Removes a job that was created but never accepted (its create
-- was not acknowledged by enough replicas): hash, stream, index entries, idempotency claim.
-- Only while it is still queued and has its first event only (nobody has touched it). 1 = removed.
local P, id = ARGV[1], ARGV[2]
local v = redis.call('HMGET', KEYS[1], 'state', '_model', '_idem', '_seq')
if not v[1] or v[1] ~= 'queued' or tonumber(v[4] or '0') > 1 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', P .. 'jobs', id)
redis.call('ZREM', P .. 'state:queued', id)
redis.call('ZREM', P .. 'model:' .. (v[2] or ''), id)
if v[3] and v[3] ~= '' then
  local ik = P .. 'idem:' .. v[3]
  local held = redis.call('GET', ik)
  if held and cjson.decode(held)[1] == id then redis.call('DEL', ik) end
end
return 1
