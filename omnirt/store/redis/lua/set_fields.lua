-- KEYS: hash. ARGV: f1, v1, ...  Sets the fields of an existing job (no read back, no event:
-- e.g. the gateway's span summaries next to an outcome its worker recorded). Returns 1, or 0 (no job).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
