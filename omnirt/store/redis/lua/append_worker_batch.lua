--! include _append.lua
-- KEYS: hash, stream. ARGV: attempt, then (index, event) pairs in order. Appends each event
-- unless this attempt's event #index is already stored (one call for a burst of a job's events).
-- Returns -1 (no job) or, cjson-packed, the new seq of each event (0: already there).
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local field = '_w' .. ARGV[1]
local have = tonumber(redis.call('HGET', KEYS[1], field) or '0')
local seqs = {}
for i = 2, #ARGV, 2 do
  local index = tonumber(ARGV[i])
  if index <= have then
    seqs[#seqs + 1] = 0
  else
    have = index
    seqs[#seqs + 1] = append(KEYS[1], KEYS[2], ARGV[i + 1])
  end
end
redis.call('HSET', KEYS[1], field, have)
return cjson.encode(seqs)
