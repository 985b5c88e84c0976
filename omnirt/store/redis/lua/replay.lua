-- KEYS: stream. ARGV: first id. Returns {entries, last entry id or ''} (subscription replay).
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+')
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last == 0 then return cjson.encode({entries, ''}) end
return cjson.encode({entries, last[1][1]})
