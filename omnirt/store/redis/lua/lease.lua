-- ARGV: P, gateway_id, ttl_ms[, identity]. Returns {the store time, or 0 when the store identity
-- P store:id is not the caller's (missing or new): the store came back empty; 1 when this refresh
-- set the fence below (nobody could refresh for a while: the store was away), else 0}. A lease is a
-- member of the P gateways zset scored by its deadline (workers that record jobs hold one too); P lease:ttl remembers each holder's TTL.
-- Fence against store pauses (an outage, a Sentinel failover): P lease:beat is the store time of
-- the last refresh by anyone. When a refresh finds a gap of more than half the shortest TTL
-- (leases are refreshed every third of theirs), nobody could refresh: the STORE was away, not
-- the gateways. P lease:fence = [that last beat, now + the longest TTL]: until then every lease
-- still running at the last beat counts as live (live.lua), so a holder whose lease ran out only
-- because the store was away gets a full lease to refresh before anyone adopts its jobs.
local P, id, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local reset = false
if ARGV[4] and ARGV[4] ~= '' and redis.call('GET', P .. 'store:id') ~= ARGV[4] then
  reset = true  -- the caller takes the current identity (identity.lua), making one if missing
end
local ttls = P .. 'lease:ttl'
if ttl < 100 then redis.call('HDEL', ttls, id) else redis.call('HSET', ttls, id, ttl) end
local shortest, longest = nil, 0
local all = redis.call('HGETALL', ttls)
for i = 1, #all, 2 do
  if redis.call('ZSCORE', P .. 'gateways', all[i]) == false and all[i] ~= id then
    redis.call('HDEL', ttls, all[i])
  else
    local v = tonumber(all[i + 1])
    if shortest == nil or v < shortest then shortest = v end
    if v > longest then longest = v end
  end
end
shortest = shortest or ttl
if longest < ttl then longest = ttl end
local beat = tonumber(redis.call('GET', P .. 'lease:beat') or '0')
local fenced = 0
if beat > 0 and now - beat > shortest / 2 then
  fenced = 1
  redis.call('SET', P .. 'lease:fence', cjson.encode({beat, now + longest}), 'PX', longest + 1000)
end
redis.call('SET', P .. 'lease:beat', now)
redis.call('ZADD', P .. 'gateways', now + ttl, id)
local old = redis.call('ZRANGEBYSCORE', P .. 'gateways', '-inf', now - 86400000)
for _, gone in ipairs(old) do redis.call('HDEL', ttls, gone) end
redis.call('ZREMRANGEBYSCORE', P .. 'gateways', '-inf', now - 86400000)
if reset then return {0, fenced} end
return {now, fenced}
