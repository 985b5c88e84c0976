--! include _append.lua
-- KEYS: hash, stream. ARGV: attempt, index, event. Appends unless this attempt's event #index is
-- already stored. Returns the new seq, 0 (already there) or -1 (no job).
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local field = '_w' .. ARGV[1]
local have = tonumber(redis.call('HGET', KEYS[1], field) or '0')
if tonumber(ARGV[2]) <= have then return 0 end
redis.call('HSET', KEYS[1], field, ARGV[2])
return append(KEYS[1], KEYS[2], ARGV[3])
