-- The webhook outbox, written in the same script as the event that triggers it (mirrors
-- omnirt/store/memory_outbox.py). The job hash's _hook field is the JSON HookSpec (+ due: the
-- due zset's key), written at create; entries live in hash .. ':hooks' (field = entry id, value
-- = entry JSON), due ones in the zset (member 'job/entry', score = due or lease-expiry ms).
-- ``raw``: the job's _hook field as the caller read it (nil or '' = no hook: nothing to do).
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function outbox(hash, raw, seq, ev)
  if not raw or raw == '' then return end
  local spec = cjson.decode(raw)
  local e = cjson.decode(ev)
  local key = e.event
  if key == 'stage_progress' and type(e.data) == 'table' and e.data.preview_url
     and e.data.preview_url ~= cjson.null and e.data.preview_url ~= '' then
    key = 'stage_progress+preview'
  end
  local kinds = spec.on[key]
  if not kinds then return end
  -- the stored event with its seq, as JSON text (the event's own JSON is kept byte for byte)
  local event = '{"seq":' .. seq .. ',' .. string.sub(ev, 2)
  local hooks = hash .. ':hooks'
  local now = now_ms()
  for _, kind in ipairs(kinds) do
    local eid = 'msg_' .. spec.job .. '_' .. seq .. '_' .. kind
    if redis.call('HEXISTS', hooks, eid) == 0 then
      local at = now
      if kind == 'progress' then
        local prev = redis.call('HGET', hooks, '_progress')
        local prev_raw = prev and redis.call('HGET', hooks, prev)
        local prev_entry = prev_raw and cjson.decode(prev_raw)
        if prev_entry and prev_entry.state == 'pending' then  -- not claimed yet: latest wins
          at = prev_entry.next_at_ms
          redis.call('HDEL', hooks, prev)
          redis.call('ZREM', spec.due, spec.job .. '/' .. prev)
        else
          local last = redis.call('HGET', hooks, '_progress_at')
          if last then at = math.max(now, tonumber(last) + spec.progress_ms) end
        end
        redis.call('HSET', hooks, '_progress', eid, '_progress_at', at)
      end
      local entry = {id = eid, job_id = spec.job, kind = kind, url = spec.url, event = event,
                     state = 'pending', attempts = 0, created_at_ms = now, next_at_ms = at}
      redis.call('HSET', hooks, eid, cjson.encode(entry))
      redis.call('ZADD', spec.due, at, spec.job .. '/' .. eid)
    end
  end
  local ttl = redis.call('PTTL', hash)
  if ttl > 0 then redis.call('PEXPIRE', hooks, ttl) end
end
