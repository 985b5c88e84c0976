-- ARGV: P, gateway_id, ttl_ms. A lease is a member of the P gateways zset scored by its deadline.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', ARGV[1] .. 'gateways', now + tonumber(ARGV[3]), ARGV[2])
redis.call('ZREMRANGEBYSCORE', ARGV[1] .. 'gateways', '-inf', now - 86400000)
return now
