local function append(hash, stream, ev)
  local seq = redis.call('HINCRBY', hash, '_seq', 1)
  redis.call('XADD', stream, seq .. '-0', 'e', ev)
  return seq
end
