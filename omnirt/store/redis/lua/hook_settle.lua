--! include _outbox.lua
-- ARGV: P, job, entry id, owner, outcome (delivered|failed|dead|retry), retry_in_ms, attempted
-- ('1'/'0'), status ('' = none), error ('' = none), body ('' = keep). Returns 1, or 0 when owner
-- no longer holds the entry.
local P, job, eid, owner, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local hooks = P .. 'job:' .. job .. ':hooks'
local raw = redis.call('HGET', hooks, eid)
if not raw then return 0 end
local entry = cjson.decode(raw)
if entry.state ~= 'delivering' or entry.owner ~= owner then return 0 end
local now = now_ms()
entry.owner = nil
entry.lease_until_ms = nil
if ARGV[10] ~= '' and (entry.body == nil or entry.body == cjson.null) then entry.body = ARGV[10] end
if ARGV[7] == '1' then
  entry.attempts = entry.attempts + 1
  entry.last_status = (ARGV[8] ~= '' and tonumber(ARGV[8])) or cjson.null
  entry.last_error = (ARGV[9] ~= '' and ARGV[9]) or cjson.null
  entry.last_attempt_at_ms = now
end
local member = job .. '/' .. eid
if outcome == 'retry' then
  entry.state = 'pending'
  entry.next_at_ms = now + tonumber(ARGV[6])
  redis.call('ZADD', P .. 'hooks:due', entry.next_at_ms, member)
else
  entry.state = outcome
  entry.next_at_ms = cjson.null
  if outcome == 'delivered' then entry.delivered_at_ms = now end
  redis.call('ZREM', P .. 'hooks:due', member)
end
redis.call('HSET', hooks, eid, cjson.encode(entry))
return 1
