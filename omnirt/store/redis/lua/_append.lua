--! include _outbox.lua
-- A job's events: ``add_events`` writes events seq+1, seq+2, ... as ONE stream entry whose id is
-- the last one's seq (an 'e' field per event, in order: omnirt.store.redis.codec.decode_entry),
-- with their webhook outbox entries (``hook``: the job's _hook field as read); it returns the
-- new last seq, which the caller stores as _seq in its own HSET. ``append``: one event, the
-- read and the write of _seq included.
local function add_events(hash, stream, seq, hook, evs)
  local fields = {}
  for _, ev in ipairs(evs) do
    seq = seq + 1
    fields[#fields + 1] = 'e'
    fields[#fields + 1] = ev
    outbox(hash, hook, seq, ev)
  end
  redis.call('XADD', stream, seq .. '-0', unpack(fields))
  return seq
end
local function append(hash, stream, ev)
  local v = redis.call('HMGET', hash, '_seq', '_hook')
  local seq = add_events(hash, stream, tonumber(v[1] or '0'), v[2], {ev})
  redis.call('HSET', hash, '_seq', seq)
  return seq
end
