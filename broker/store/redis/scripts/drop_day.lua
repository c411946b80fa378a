-- drop_day: delete a day's usage rows and its row index.
--
-- KEYS
--   1    the day's row index (P:usage:{d:<day>})
-- ARGV
--   1    the day's row key prefix (P:usage:{d:<day>}:)
-- STORED-DATA KEYS
--   ARGV[1] .. each row in KEYS[1]: the index names them; same slot {d:<day>}
-- Returns how many rows it deleted.
local rows = redis.call('SMEMBERS', KEYS[1])
for _, row in ipairs(rows) do redis.call('DEL', ARGV[1] .. row) end
redis.call('DEL', KEYS[1])
return #rows
