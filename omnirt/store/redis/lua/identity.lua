-- ARGV: P, candidate. The store's identity: P store_id, set to ``candidate`` when missing (a new
-- or emptied Redis). A gateway that saw another identity before knows the store lost its data.
local key = ARGV[1] .. 'store_id'
local v = redis.call('GET', key)
if not v then
  redis.call('SET', key, ARGV[2])
  v = ARGV[2]
end
return v
