-- end_leases: end every active, unexpired lease of one key of an account as revoked (its key
-- was revoked): out of the active-lease index, into the ended-lease index, units not refunded.
--
-- KEYS
--   1    the account's active-lease index (P:{T}:active)
--   2    the account's ended-lease index (P:{T}:done)
-- ARGV
--   1    key_id
--   2    now (epoch seconds, the broker's clock)
--   3    the account's lease key prefix (P:{T}:lease:)
--   4    how long an ended lease is kept, in ms
-- STORED-DATA KEYS
--   ARGV[3] .. each lease id in KEYS[1]: the index names them; same slot {T}
-- Returns the fields of every lease it ended.
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[2], '+inf')) do
  local lk = ARGV[3] .. id
  local f = redis.call('HMGET', lk, 'key_id', 'status')
  if f[1] == ARGV[1] and f[2] == 'active' then
    redis.call('HSET', lk, 'status', 'revoked', 'finished_at', ARGV[2])
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    redis.call('PEXPIRE', lk, ARGV[4])
    out[#out + 1] = redis.call('HGETALL', lk)
  end
end
return out
