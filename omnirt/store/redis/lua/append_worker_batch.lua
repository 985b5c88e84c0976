--! include _append.lua
-- KEYS: hash, stream. ARGV: attempt, n, f1, v1 ... (n fields set with the burst, e.g. the
-- worker's runner mark), then (index, event) pairs in order. Appends each event unless this
-- attempt's event #index is already stored (one call, one stream entry for a burst of a job's
-- events); a terminal job takes no more (its terminal event stays the last one). Returns -1
-- (no job) or, cjson-packed, the new seq of each event (0: already there, or the job is terminal).
local field = '_w' .. ARGV[1]
local v = redis.call('HMGET', KEYS[1], 'state', field, '_seq', '_hook')
if not v[1] then return -1 end
local n = tonumber(ARGV[2])
local first = 3 + 2 * n
local seqs = {}
if v[1] == 'succeeded' or v[1] == 'failed' or v[1] == 'cancelled' then
  for i = first, #ARGV, 2 do seqs[#seqs + 1] = 0 end
  return cjson.encode(seqs)
end
local have = tonumber(v[2] or '0')
local seq = tonumber(v[3] or '0')
local fv = {}
for i = 3, first - 1 do fv[#fv + 1] = ARGV[i] end
local evs = {}
for i = first, #ARGV, 2 do
  local index = tonumber(ARGV[i])
  if index <= have then
    seqs[#seqs + 1] = 0
  else
    have = index
    evs[#evs + 1] = ARGV[i + 1]
    seqs[#seqs + 1] = seq + #evs
  end
end
if #evs > 0 then
  fv[#fv + 1] = '_seq'
  fv[#fv + 1] = add_events(KEYS[1], KEYS[2], seq, v[4], evs)
end
fv[#fv + 1] = field
fv[#fv + 1] = have
redis.call('HSET', KEYS[1], unpack(fv))
return cjson.encode(seqs)
