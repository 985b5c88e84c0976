-- ARGV: P, gateway_id, ttl_ms. A lease is a member of the P gateways zset scored by its deadline.
-- Fence against store pauses (an outage, a Sentinel failover): P lease:beat is the store time of
-- the last refresh by any gateway. When the refresh that comes after it finds a gap of more than
-- half a lease (leases are refreshed every third of one), nobody could refresh: the STORE was
-- away, not the gateways. P lease:fence = [that last beat, now + ttl]: until now + ttl every
-- gateway whose lease was still running at the last beat counts as live (live.lua), so a
-- gateway whose lease ran out only because the store was away gets one full lease to refresh
-- before anyone adopts its jobs.
local P, ttl = ARGV[1], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local beat = tonumber(redis.call('GET', P .. 'lease:beat') or '0')
if beat > 0 and now - beat > ttl / 2 then
  redis.call('SET', P .. 'lease:fence', cjson.encode({beat, now + ttl}), 'PX', ttl + 1000)
end
redis.call('SET', P .. 'lease:beat', now)
redis.call('ZADD', P .. 'gateways', now + ttl, ARGV[2])
redis.call('ZREMRANGEBYSCORE', P .. 'gateways', '-inf', now - 86400000)
return now
