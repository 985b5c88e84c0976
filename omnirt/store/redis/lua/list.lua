-- ARGV: P, state ('' = any), model ('' = any), limit, tenant (its JSON form as stored; '' = any).
-- Returns a list of hgetall, newest first.
local P, state, model, limit, tenant = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5] or ''
local idx, check_state, check_model = P .. 'jobs', false, false
if state ~= '' and model ~= '' then
  local a, b = P .. 'state:' .. state, P .. 'model:' .. model
  if redis.call('ZCARD', a) <= redis.call('ZCARD', b) then idx = a; check_model = true
  else idx = b; check_state = true end
elseif state ~= '' then idx = P .. 'state:' .. state
elseif model ~= '' then idx = P .. 'model:' .. model end
local out = {}
local start, batch = 0, math.max(limit * 2, 64)
while #out < limit do
  local ids = redis.call('ZREVRANGE', idx, start, start + batch - 1)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local key = P .. 'job:' .. id
    local ok = true
    if check_state or check_model or tenant ~= '' then
      local v = redis.call('HMGET', key, 'state', '_model', 'tenant')
      ok = v[1] and (not check_state or v[1] == state) and (not check_model or v[2] == model)
        and (tenant == '' or v[3] == tenant)
    end
    if ok then
      local h = redis.call('HGETALL', key)
      if #h > 0 then
        out[#out + 1] = h
        if #out >= limit then break end
      end
    end
  end
  start = start + batch
end
return cjson.encode(out)
