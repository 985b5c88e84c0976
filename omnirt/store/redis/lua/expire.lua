-- ARGV: P, batch, state1, state2, ...  Returns {dropped, scanned}.
local P, batch = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local members = redis.call('ZRANGEBYSCORE', P .. 'terminal', '-inf', now, 'LIMIT', 0, batch)
local n = 0
for _, m in ipairs(members) do
  local e = cjson.decode(m)
  local id, model = e[1], e[2]
  if redis.call('EXISTS', P .. 'job:' .. id) == 0 then
    redis.call('ZREM', P .. 'jobs', id)
    for i = 3, #ARGV do redis.call('ZREM', P .. 'state:' .. ARGV[i], id) end
    if model ~= '' then redis.call('ZREM', P .. 'model:' .. model, id) end
    redis.call('ZREM', P .. 'terminal', m)
    n = n + 1
  end
end
return {n, #members}
