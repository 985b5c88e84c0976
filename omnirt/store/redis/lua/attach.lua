-- KEYS: hash, stream. ARGV: first id. An event stream's start in one round trip: the job's
-- record and its events from the first id, read together. Returns nil (no job) or
-- {hgetall, entries, last seq} (the stream's last seq is the hash's _seq: add_events keeps them equal).
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return false end
local seq = 0
for i = 1, #h, 2 do
  if h[i] == '_seq' then seq = tonumber(h[i + 1]) or 0; break end
end
return cjson.encode({h, redis.call('XRANGE', KEYS[2], ARGV[1], '+'), seq})
