-- drop_day: delete one account's usage rows of a day and their index.
--
-- KEYS
--   1    the day's row index (P:{T}:u:<day>)
-- ARGV
--   1    the day's row key prefix (P:{T}:u:<day>:)
-- STORED-DATA KEYS
--   ARGV[1] .. each row in KEYS[1]: the index names them; same slot {T}
-- Returns how many rows it deleted.
local rows = redis.call('SMEMBERS', KEYS[1])
for _, row in ipairs(rows) do redis.call('DEL', ARGV[1] .. row) end
redis.call('DEL', KEYS[1])
return #rows
