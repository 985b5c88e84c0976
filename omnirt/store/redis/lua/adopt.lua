-- KEYS: hash. ARGV: from_owner, to_owner. 1 when the job moved to the new owner.
local v = redis.call('HGET', KEYS[1], '_owner')
if v == false or v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], '_owner', ARGV[2])
return 1
