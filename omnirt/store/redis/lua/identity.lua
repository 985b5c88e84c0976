-- ARGV: P, candidate. The store's identity (P store:id): set to the candidate when missing
-- (a fresh Redis), returned as it is otherwise. A store that loses it came back empty.
local v = redis.call('GET', ARGV[1] .. 'store:id')
if v then return v end
redis.call('SET', ARGV[1] .. 'store:id', ARGV[2])
return ARGV[2]
