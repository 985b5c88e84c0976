--! include _outbox.lua
local function append(hash, stream, ev)
  local seq = redis.call('HINCRBY', hash, '_seq', 1)
  redis.call('XADD', stream, seq .. '-0', 'e', ev)
  outbox(hash, seq, ev)
  return seq
end
