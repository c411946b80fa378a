-- report_state: what a report on a lease starts from: the answer of an earlier report, the
-- key's and its account's health records and the key's statistics.
--
-- KEYS
--   1    the lease (P:{T}:lease:<id>)
--   2    the account's health records (P:{T}:health)
--   3    the account's key statistics (P:{T}:stats)
-- ARGV
--   1    the key's health subject
--   2    the account's health subject
--   3    key_id
--   4    the account's paid-use subject ('' = none)
-- Returns {reported answer, key record, account record, statistics, paid-use record}, each
-- '' when absent.
local paid = ''
if ARGV[4] ~= '' then paid = redis.call('HGET', KEYS[2], ARGV[4]) or '' end
return {redis.call('HGET', KEYS[1], 'reported') or '', redis.call('HGET', KEYS[2], ARGV[1]) or '',
  redis.call('HGET', KEYS[2], ARGV[2]) or '', redis.call('HGET', KEYS[3], ARGV[3]) or '', paid}
