-- prune: delete an account's ended windows and the leases that ended before a cutoff, up
-- to a batch of each.
--
-- KEYS
--   1    the account's window-ends index (P:{T}:ends)
--   2    the account's ended-lease index (P:{T}:done)
-- ARGV
--   1    now (epoch seconds, the broker's clock)
--   2    the cutoff: leases that ended before it go
--   3    batch: how many windows and how many leases at most
--   4    the account's window key prefix (P:{T}:w:)
--   5    the account's lease key prefix (P:{T}:lease:)
-- STORED-DATA KEYS
--   ARGV[4] .. each ended window name in KEYS[1], and ARGV[5] .. each old lease id in
--   KEYS[2]: the indexes name them; same slot {T}
-- Returns {windows deleted, leases deleted, {idempotency key, lease id, ...}} of the deleted
-- leases that had a request_id (the caller frees those with forget).
local names = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, name in ipairs(names) do
  redis.call('DEL', ARGV[4] .. name)
  redis.call('ZREM', KEYS[1], name)
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
local forget = {}
for _, id in ipairs(ids) do
  local ik = redis.call('HGET', ARGV[5] .. id, 'ik')
  if ik and ik ~= '' then
    forget[#forget + 1] = ik
    forget[#forget + 1] = id
  end
  redis.call('DEL', ARGV[5] .. id)
  redis.call('ZREM', KEYS[2], id)
end
return {#names, #ids, forget}
