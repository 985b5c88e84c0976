-- ARGV: P. Returns the ids of gateways whose lease has not run out, or that were live when the
-- store went away while the fence set by lease.lua holds.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local since = now
local fence = redis.call('GET', ARGV[1] .. 'lease:fence')
if fence then
  local f = cjson.decode(fence)
  if now < f[2] and f[1] < since then since = f[1] end
end
return cjson.encode(redis.call('ZRANGEBYSCORE', ARGV[1] .. 'gateways', since, '+inf'))
