--! include _append.lua
-- KEYS: hash, stream. ARGV: event. Returns the new seq, or -1 (no job).
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return append(KEYS[1], KEYS[2], ARGV[1])
