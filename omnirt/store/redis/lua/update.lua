--! include _append.lua
-- KEYS: hash, stream. ARGV: event ('' = none), f1, v1, ...  Returns hgetall or nil (no job).
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if #ARGV > 1 then
  local fv = {}
  for i = 2, #ARGV do fv[#fv + 1] = ARGV[i] end
  redis.call('HSET', KEYS[1], unpack(fv))
end
if ARGV[1] ~= '' then append(KEYS[1], KEYS[2], ARGV[1]) end
return cjson.encode(redis.call('HGETALL', KEYS[1]))
