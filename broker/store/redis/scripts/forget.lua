-- forget: delete an idempotency record (or a cluster claim) if it still names a pruned
-- lease, so the request_id is free again.
--
-- KEYS
--   1    the idempotency key (P:idem:<n>:<principal>:<request_id>)
-- ARGV
--   1    the pruned lease's id
-- Returns 1 when it was deleted, else 0.
local v = redis.call('GET', KEYS[1])
if v and (v == ARGV[1] or string.sub(v, 1, #ARGV[1] + 1) == ARGV[1] .. ' ') then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
