-- KEYS: idem key. ARGV: P, job_id, fingerprint, pending_grace_ms, pending_ttl_ms.
-- Returns the held JSON value, or nil when this call claimed the key.
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = redis.call('GET', KEYS[1])
if v then
  local h = cjson.decode(v)
  if redis.call('EXISTS', P .. 'job:' .. h[1]) == 1 or now - (tonumber(h[3]) or 0) < tonumber(ARGV[4]) then
    return v
  end
end
local value = cjson.encode({ARGV[2], ARGV[3], now})
local pttl = redis.call('PTTL', P .. 'job:' .. ARGV[2])
if pttl == -1 then
  redis.call('SET', KEYS[1], value)
elseif pttl > 0 then
  redis.call('SET', KEYS[1], value, 'PX', pttl)
else
  redis.call('SET', KEYS[1], value, 'PX', ARGV[5])
end
return false
