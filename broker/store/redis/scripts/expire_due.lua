-- expire_due: mark an account's active leases whose time has passed as expired.
--
-- KEYS
--   1    the account's active-lease index (P:{T}:active)
--   2    the account's ended-lease index (P:{T}:done)
-- ARGV
--   1    now (epoch seconds, the broker's clock)
--   2    how many leases at most
--   3    the account's lease key prefix (P:{T}:lease:)
--   4    how long an ended lease is kept, in ms
-- STORED-DATA KEYS
--   ARGV[3] .. each due lease id in KEYS[1]: the index names them; same slot {T}
-- Returns the fields of every lease it expired.
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])) do
  local lk = ARGV[3] .. id
  redis.call('ZREM', KEYS[1], id)
  if redis.call('HGET', lk, 'status') == 'active' then
    redis.call('HSET', lk, 'status', 'expired', 'finished_at', ARGV[1])
    redis.call('ZADD', KEYS[2], ARGV[1], id)
    redis.call('PEXPIRE', lk, ARGV[4])
    out[#out + 1] = redis.call('HGETALL', lk)
  end
end
return out
