local function retain(P, id, hash, stream, retention_ms)
  local t = redis.call('TIME')
  local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + retention_ms
  redis.call('PEXPIRE', hash, retention_ms)
  redis.call('PEXPIRE', stream, retention_ms)
  redis.call('PEXPIRE', hash .. ':hooks', retention_ms)
  local idem = redis.call('HGET', hash, '_idem')
  if idem and idem ~= '' then
    local ik = P .. 'idem:' .. idem
    local v = redis.call('GET', ik)
    if v and cjson.decode(v)[1] == id then redis.call('PEXPIRE', ik, retention_ms) end
  end
  local model = redis.call('HGET', hash, '_model') or ''
  redis.call('ZADD', P .. 'terminal', deadline, cjson.encode({id, model}))
  redis.call('HSET', hash, '_expires_at_ms', deadline)
end
