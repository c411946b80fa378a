-- day_rows: read every usage row of a day.
--
-- KEYS
--   1    the day's row index (P:usage:{d:<day>})
-- ARGV
--   1    the day's row key prefix (P:usage:{d:<day>}:)
-- STORED-DATA KEYS
--   ARGV[1] .. each row in KEYS[1]: the index names them; same slot {d:<day>}
-- Returns {{row, row fields}, ...}.
local out = {}
for _, row in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = {row, redis.call('HGETALL', ARGV[1] .. row)}
end
return out
