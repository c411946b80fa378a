-- renew: move an active, unexpired lease's expiry.
--
-- KEYS
--   1    the lease (P:{T}:lease:<id>)
--   2    the account's active-lease index (P:{T}:active)
-- ARGV
--   1    lease_id
--   2    the new expires_at (epoch seconds)
--   3    now (epoch seconds, the broker's clock)
--   4    the lease's new TTL in ms
-- Returns {'missing'}, {'renewed', lease fields} or {'inactive', lease fields}.
local f = redis.call('HMGET', KEYS[1], 'status', 'expires_at')
if not f[1] then return {'missing'} end
if f[1] == 'active' and tonumber(f[2]) > tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'expires_at', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {'renewed', redis.call('HGETALL', KEYS[1])}
end
return {'inactive', redis.call('HGETALL', KEYS[1])}
