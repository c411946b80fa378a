-- report: apply one provider answer on a lease, all or nothing, at most once per lease: the
-- health records it changes (compared with what the caller read), the key's statistics, a
-- reconciled window, the day's usage row, and the answer kept in the lease (a retried
-- report gets that answer back and changes nothing).
--
-- KEYS
--   1    the lease (P:{T}:lease:<id>)
--   2    the account's health records (P:{T}:health)
--   3    the account's key statistics (P:{T}:stats)
--   4    the account's window-ends index (P:{T}:ends)
--   5    the account's usage days (P:{T}:udays)
--   6    the account's usage rows of the day (P:{T}:u:<day>)
--   7    the usage row (P:{T}:u:<day>:<row>)
--   ...  KEYS[8]: the window to set, only when ARGV[16] ~= '' (P:{T}:w:<name>); all KEYS in
--        the account's slot {T}
-- ARGV
--   1    the answer (health JSON) kept in the lease's `reported` field
--   2    key_id (field of KEYS[3])
--   3    the statistics read before ('' = none), compared
--   4    the new statistics ('' = unchanged)
--   5    day (YYYY-MM-DD)
--   6    the row (JSON key_id, account, model, principal), as listed in KEYS[6]
--   7    failed: 1 or 0
--   8    prompt tokens
--   9    completion tokens
--   10   cost
--   11   latency in ms
--   12   the latency bucket's field (b<i>)
--   13   (unused, '0')
--   14   the number of health changes
--   15   (unused, '')
--   16   the window's name ('' = no window set)
--   17   its count
--   18   its ends_at (epoch seconds)
--   19   its TTL in ms, when it is new
--   ...  per health change: subject, the record read before ('' = none), the new record
--        ('' = delete)
-- Returns {'missing'}; {'same', answer} when the lease was reported before; {'conflict'}
-- when a record changed since it was read (nothing written: read again and retry); or
-- {'applied', answer}.
-- every key of the expected type (or absent) before anything is written: a script that fails
-- midway keeps what it wrote, so all that could fail is checked first
local types = {'hash', 'hash', 'hash', 'zset', 'zset', 'set', 'hash', 'string'}
for i = 1, #KEYS do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'none' and t ~= types[i] then
    return redis.error_reply('report: ' .. KEYS[i] .. ' is a ' .. t .. ', not a ' .. types[i])
  end
end
local prev = redis.call('HGET', KEYS[1], 'reported')
if prev then return {'same', prev} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local n = tonumber(ARGV[14])
for i = 0, n - 1 do
  local subject, before = ARGV[20 + 3 * i], ARGV[21 + 3 * i]
  if (redis.call('HGET', KEYS[2], subject) or '') ~= before then return {'conflict'} end
end
if (redis.call('HGET', KEYS[3], ARGV[2]) or '') ~= ARGV[3] then return {'conflict'} end
for i = 0, n - 1 do
  local subject, after = ARGV[20 + 3 * i], ARGV[22 + 3 * i]
  if after == '' then
    redis.call('HDEL', KEYS[2], subject)
  else
    redis.call('HSET', KEYS[2], subject, after)
  end
end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[2], ARGV[4]) end
if ARGV[16] ~= '' then
  if redis.call('EXISTS', KEYS[8]) == 1 then
    redis.call('SET', KEYS[8], ARGV[17], 'KEEPTTL')
  else
    redis.call('SET', KEYS[8], ARGV[17], 'PX', ARGV[19])
    redis.call('ZADD', KEYS[4], ARGV[18], ARGV[16])
  end
end
redis.call('ZADD', KEYS[5], 0, ARGV[5])
redis.call('SADD', KEYS[6], ARGV[6])
redis.call('HINCRBY', KEYS[7], 'requests', 1)
redis.call('HINCRBY', KEYS[7], 'failures', ARGV[7])
redis.call('HINCRBY', KEYS[7], 'prompt_tokens', ARGV[8])
redis.call('HINCRBY', KEYS[7], 'completion_tokens', ARGV[9])
redis.call('HINCRBYFLOAT', KEYS[7], 'cost', ARGV[10])
redis.call('HINCRBY', KEYS[7], 'latency_ms_sum', ARGV[11])
redis.call('HINCRBY', KEYS[7], ARGV[12], 1)
redis.call('HSET', KEYS[1], 'reported', ARGV[1])
return {'applied', ARGV[1]}
