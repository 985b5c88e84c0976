--! include _outbox.lua
-- KEYS: job hash, hooks hash. ARGV: P, job, ',ids,' ('' = every settled entry). Makes settled
-- entries due now (same ids, attempts and age start again); returns the JSON array of those re-queued, or nil (no such job).
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local P, job, ids = ARGV[1], ARGV[2], ARGV[3]
local now = now_ms()
local out = {}
local flat = redis.call('HGETALL', KEYS[2])
for i = 1, #flat, 2 do
  local eid = flat[i]
  if string.sub(eid, 1, 1) ~= '_' and (ids == '' or string.find(ids, ',' .. eid .. ',', 1, true)) then
    local entry = cjson.decode(flat[i + 1])
    if entry.state ~= 'pending' and entry.state ~= 'delivering' then
      entry.state = 'pending'
      entry.next_at_ms = now
      entry.attempts = 0  -- a fresh round of attempts (and of age) under the same id
      entry.created_at_ms = now
      local encoded = cjson.encode(entry)
      redis.call('HSET', KEYS[2], eid, encoded)
      redis.call('ZADD', P .. 'hooks:due', now, job .. '/' .. eid)
      out[#out + 1] = encoded
    end
  end
end
return '[' .. table.concat(out, ',') .. ']'
