-- ARGV: P, id1, id2, ... Returns {state or '' per id}.
local out = {}
for i = 2, #ARGV do
  out[#out + 1] = redis.call('HGET', ARGV[1] .. 'job:' .. ARGV[i], 'state') or ''
end
return cjson.encode(out)
