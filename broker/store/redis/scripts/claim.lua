-- claim: claim a request_id on a Redis Cluster for the lease a call is about to grant, move
-- the claim, or remove it. A claim's value is "<lease id> <deadline>", the deadline in ms
-- by Redis's own clock (TIME).
--
-- KEYS
--   1    the idempotency key (P:idem:<n>:<principal>:<request_id>)
-- ARGV
--   1    the lease id to claim it for ('' = remove the caller's claim)
--   2    the claim's TTL in ms
--   3    the value the caller holds ('' = none)
--   4    the holder's budget in ms: the deadline is that far past Redis's now
-- Returns {value} when the caller now holds the claim with that value; {found, 1/0 whether
-- its deadline has passed} when it is someone else's (nothing changed); false when it was
-- removed or absent.
local v = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if v and v ~= ARGV[3] then
  local deadline = tonumber(string.match(v, ' (%d+)$'))
  return {v, (deadline == nil or deadline <= now) and 1 or 0}
end
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
  return false
end
local mine = ARGV[1] .. ' ' .. tostring(now + tonumber(ARGV[4]))
redis.call('SET', KEYS[1], mine, 'PX', ARGV[2])
return {mine}
