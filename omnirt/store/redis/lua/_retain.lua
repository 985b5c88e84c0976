-- Starts a terminal job's retention: every key of the job expires after retention_ms, and the
-- P terminal index says when (expire.lua drops its index entries then). ``idem``, ``model``,
-- ``hook``: the job's _idem, _model and _hook fields as the caller read them. Returns the
-- deadline (ms), which the caller stores as _expires_at_ms in its own HSET.
local function retain(P, id, hash, stream, retention_ms, idem, model, hook)
  local t = redis.call('TIME')
  local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + retention_ms
  redis.call('PEXPIRE', hash, retention_ms)
  redis.call('PEXPIRE', stream, retention_ms)
  if hook and hook ~= '' then redis.call('PEXPIRE', hash .. ':hooks', retention_ms) end
  if idem and idem ~= '' then
    local ik = P .. 'idem:' .. idem
    local v = redis.call('GET', ik)
    if v and cjson.decode(v)[1] == id then redis.call('PEXPIRE', ik, retention_ms) end
  end
  redis.call('ZADD', P .. 'terminal', deadline, cjson.encode({id, model or ''}))
  return deadline
end
