-- set_counter: set a window's count (a restored or corrected count), keeping its TTL when it
-- exists; a new window also joins the account's window-ends index.
--
-- KEYS
--   1    the window (P:{T}:w:<name>)
--   2    the account's window-ends index (P:{T}:ends)
-- ARGV
--   1    the window's name
--   2    its count
--   3    ends_at (epoch seconds)
--   4    the window's TTL in ms, when it is new
-- Returns 1 when the window was new, else 0.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
