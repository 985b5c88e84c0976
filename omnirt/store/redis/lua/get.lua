-- KEYS: hash, stream. ARGV: with_events ('1'/'0'). Returns {hgetall[, entries]} or nil.
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return false end
if ARGV[1] == '1' then return cjson.encode({h, redis.call('XRANGE', KEYS[2], '-', '+')}) end
return cjson.encode({h})
