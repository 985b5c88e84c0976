-- ARGV: P, limit, ",live1,live2,". Returns {{id, owner, state}...} of unfinished jobs whose owner
-- is not live.
local P, limit, live = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local out = {}
for _, state in ipairs({'queued', 'running', 'cancelling'}) do
  local ids = redis.call('ZRANGE', P .. 'state:' .. state, 0, -1)
  for _, id in ipairs(ids) do
    local v = redis.call('HMGET', P .. 'job:' .. id, 'state', '_owner')
    if v[1] and not string.find(live, ',' .. (v[2] or '') .. ',', 1, true) then
      out[#out + 1] = {id, v[2] or '', v[1]}
      if #out >= limit then return cjson.encode(out) end
    end
  end
end
return cjson.encode(out)
