-- complete: end an active lease, as completed, or as expired when its time has passed;
-- refund its units to every window it was charged to when it was completed unused.
--
-- KEYS
--   1    the lease (P:{T}:lease:<id>)
--   2    the account's active-lease index (P:{T}:active)
--   3    the account's ended-lease index (P:{T}:done)
-- ARGV
--   1    lease_id
--   2    used: '1', or '0' to refund
--   3    now (epoch seconds, the broker's clock)
--   4    how long the ended lease is kept, in ms
--   5    the account's window key prefix (P:{T}:w:)
--   6    the key prefix of windows spanning accounts (P:{shared}:w:)
--   7    the name prefix of such windows (SHARED_WINDOW)
-- STORED-DATA KEYS
--   ARGV[5] .. each window name in the lease's `windows` field (refunded): the windows are
--   known only from the lease, and share its slot {T}; or ARGV[6] .. the name of a window
--   whose name starts with ARGV[7] (only on a single Redis: a cluster refuses such windows)
-- Returns {'missing'}; {'same', lease fields} when it had already ended; or
-- {'changed', lease fields}.
local f = redis.call('HMGET', KEYS[1], 'status', 'expires_at', 'units', 'windows')
if not f[1] then return {'missing'} end
if f[1] ~= 'active' then return {'same', redis.call('HGETALL', KEYS[1])} end
local status, refund = 'completed', ARGV[2] == '0'
if tonumber(f[2]) <= tonumber(ARGV[3]) then status, refund = 'expired', false end
if refund then
  local units = tonumber(f[3])
  for _, name in ipairs(cjson.decode(f[4])) do
    local key = ARGV[5] .. name
    if ARGV[7] ~= '' and string.sub(name, 1, #ARGV[7]) == ARGV[7] then key = ARGV[6] .. name end
    local v = tonumber(redis.call('GET', key))
    if v then
      v = v - units
      if v < 0 then v = 0 end
      redis.call('SET', key, v, 'KEEPTTL')
    end
  end
end
redis.call('HSET', KEYS[1], 'status', status, 'refunded', refund and '1' or '0',
  'finished_at', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'changed', redis.call('HGETALL', KEYS[1])}
