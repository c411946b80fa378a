-- active: count an account's active, unexpired leases per key.
--
-- KEYS
--   1    the account's active-lease index (P:{T}:active)
-- ARGV
--   1    now (epoch seconds, the broker's clock)
--   2    the account's lease key prefix (P:{T}:lease:)
-- STORED-DATA KEYS
--   ARGV[2] .. each lease id in KEYS[1]: the index names them; same slot {T}
-- Returns {key_id, count, ...}.
local counts, order = {}, {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')) do
  local kid = redis.call('HGET', ARGV[2] .. id, 'key_id')
  if kid then
    if not counts[kid] then
      counts[kid] = 0
      order[#order + 1] = kid
    end
    counts[kid] = counts[kid] + 1
  end
end
local out = {}
for _, kid in ipairs(order) do
  out[#out + 1] = kid
  out[#out + 1] = counts[kid]
end
return out
