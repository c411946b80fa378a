-- day_rows: read every usage row of one account on one day.
--
-- KEYS
--   1    the day's row index (P:{T}:u:<day>)
-- ARGV
--   1    the day's row key prefix (P:{T}:u:<day>:)
-- STORED-DATA KEYS
--   ARGV[1] .. each row in KEYS[1]: the index names them; same slot {T}
-- Returns {{row, row fields}, ...}.
local out = {}
for _, row in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = {row, redis.call('HGETALL', ARGV[1] .. row)}
end
return out
