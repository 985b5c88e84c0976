-- ARGV: P. Returns the ids of gateways whose lease has not run out.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return cjson.encode(redis.call('ZRANGEBYSCORE', ARGV[1] .. 'gateways', now, '+inf'))
