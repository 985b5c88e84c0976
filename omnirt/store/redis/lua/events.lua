-- KEYS: hash, stream. ARGV: first id. Returns {entries} or nil (no job).
local entries = redis.call('XRANGE', KEYS[2], ARGV[1], '+')
if #entries == 0 and redis.call('EXISTS', KEYS[1]) == 0 then return false end
return cjson.encode({entries})
