--! include _outbox.lua
-- ARGV: P, limit, owner, lease_ms. Claims due entries (pending and due, or delivering under an
-- expired lease) for owner; returns the JSON array of the claimed entries.
local P, limit, owner, lease = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local due = P .. 'hooks:due'
local now = now_ms()
local out = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, limit)) do
  local slash = string.find(member, '/', 1, true)
  local job, eid = string.sub(member, 1, slash - 1), string.sub(member, slash + 1)
  local hooks = P .. 'job:' .. job .. ':hooks'
  local raw = redis.call('HGET', hooks, eid)
  local entry = raw and cjson.decode(raw)
  if not entry or (entry.state ~= 'pending' and entry.state ~= 'delivering') then
    redis.call('ZREM', due, member)  -- the job expired, or the entry was settled
  else
    entry.state = 'delivering'
    entry.owner = owner
    entry.lease_until_ms = now + lease
    if redis.call('HGET', hooks, '_progress') == eid then redis.call('HDEL', hooks, '_progress') end
    local encoded = cjson.encode(entry)
    redis.call('HSET', hooks, eid, encoded)
    redis.call('ZADD', due, now + lease, member)
    out[#out + 1] = encoded
  end
end
return '[' .. table.concat(out, ',') .. ']'
