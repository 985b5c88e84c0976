-- ARGV: P, gateway_id, ttl_ms. A lease is a member of the P gateways zset scored by its deadline.
-- Fence against a store outage: P lease_clock holds the store time (TIME) of the last renewal
-- by any gateway. When it is older than a TTL, no gateway could renew (the store was stopped,
-- paused or restarted from disk) and leases that ran out meanwhile say nothing about their
-- gateways: every lease is pushed to now + ttl, so a live gateway has a full TTL to renew
-- before anyone adopts its jobs. Returns {now, 1 if the leases were fenced else 0}.
local P, ttl = ARGV[1], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(redis.call('GET', P .. 'lease_clock') or '')
local fenced = 0
if last and now - last > ttl then
  local stale = redis.call('ZRANGEBYSCORE', P .. 'gateways', '-inf', now + ttl)
  for _, gateway in ipairs(stale) do
    redis.call('ZADD', P .. 'gateways', now + ttl, gateway)
  end
  fenced = 1
end
redis.call('SET', P .. 'lease_clock', now)
redis.call('ZADD', P .. 'gateways', now + ttl, ARGV[2])
redis.call('ZREMRANGEBYSCORE', P .. 'gateways', '-inf', now - 86400000)
return {now, fenced}
