-- KEYS: job hash, hooks hash. Returns the JSON array of the job's entries, or nil (no such job).
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local out = {}
local flat = redis.call('HGETALL', KEYS[2])
for i = 1, #flat, 2 do
  if string.sub(flat[i], 1, 1) ~= '_' then out[#out + 1] = flat[i + 1] end
end
return '[' .. table.concat(out, ',') .. ']'
