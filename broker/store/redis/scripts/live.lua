-- live: one page of an account's windows that have not ended, with their counts.
--
-- KEYS
--   1    the account's window-ends index (P:{T}:ends)
-- ARGV
--   1    now (epoch seconds, the broker's clock)
--   2    offset into the windows not ended
--   3    page size
--   4    the account's window key prefix (P:{T}:w:)
-- STORED-DATA KEYS
--   ARGV[4] .. each window name in KEYS[1]: the index names them; same slot {T}
-- Returns {how many names the page scanned, {name, count, ...}}.
local out = {}
local names = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'LIMIT', ARGV[2], ARGV[3])
for _, name in ipairs(names) do
  local v = redis.call('GET', ARGV[4] .. name)
  if v then
    out[#out + 1] = name
    out[#out + 1] = tonumber(v)
  end
end
return {#names, out}
