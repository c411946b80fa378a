-- reserve: check every window of each candidate in order, charge the first candidate that
-- fits and record its lease, all or nothing; on a single Redis it also keeps the
-- request_id's idempotency record, in the same call.
--
-- KEYS
--   ...  the idempotency key first, only when ARGV[1] == '1'; then per candidate: its new
--        lease (P:{T}:lease:<id>), the account's active-lease index (P:{T}:active) and
--        window-ends index (P:{T}:ends), then each of its windows (P:{T}:w:<name>);
--        all of one candidate in its account's slot {T}
-- ARGV
--   1    '1' when this call keeps the idempotency record in KEYS[1], else '0'
--   2    principal
--   3    request_id ('' = none)
--   4    pool
--   5    model
--   6    units to charge
--   7    created_at (epoch seconds, the broker's clock)
--   8    expires_at (epoch seconds)
--   9    the lease's TTL in ms (also the idempotency record's)
--   10   an idempotency value found stale (its lease is gone): overwritten, not reported
--        ('' = none)
--   11   the number of candidates
--   12   the idempotency key's name, kept in the lease as `ik` ('' without a request_id)
--   ...  per candidate: lease_id, key_id, account, key_version, its window names as JSON, n,
--        then n x
--        (window name, limit, ends_at, window TTL in ms)
-- Returns {'claimed', value} when KEYS[1] already names a lease (the caller replays that
-- lease, or calls again with the value in ARGV[10] when it is gone); {'grant', candidate
-- number, {name, count, ...}} of the charged windows; or {'reject', {name, count, ...}} of
-- every window seen.
local k = 1
if ARGV[1] == '1' then
  k = 2
  local prev = redis.call('GET', KEYS[1])
  if prev and prev ~= ARGV[10] then return {'claimed', prev} end
end
local units = tonumber(ARGV[6])
local seen = {}
local a = 13
for c = 1, tonumber(ARGV[11]) do
  local lease_id, key_id, account, version, names, n = ARGV[a], ARGV[a + 1], ARGV[a + 2],
    ARGV[a + 3], ARGV[a + 4], tonumber(ARGV[a + 5])
  a = a + 6
  local lk = k  -- KEYS[lk] the lease, KEYS[lk + 1] active, KEYS[lk + 2] ends
  k = k + 3
  local wins, fits = {}, true
  for w = 1, n do
    local name, limit, ends, ttl = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3]
    a = a + 4
    local used = tonumber(redis.call('GET', KEYS[k])) or 0
    seen[#seen + 1] = name
    seen[#seen + 1] = used
    if used + units > limit then fits = false end
    wins[w] = {name, k, ends, ttl}
    k = k + 1
  end
  if fits then
    local out = {}
    for _, x in ipairs(wins) do
      local name, wk, ends, ttl = unpack(x)
      local now_used = redis.call('INCRBY', KEYS[wk], units)
      if now_used == units then
        redis.call('PEXPIRE', KEYS[wk], ttl)
        redis.call('ZADD', KEYS[lk + 2], ends, name)
      end
      out[#out + 1] = name
      out[#out + 1] = now_used
    end
    if ARGV[1] == '1' and ARGV[12] ~= '' then
      redis.call('SET', KEYS[1], lease_id, 'PX', ARGV[9])
    end
    redis.call('HSET', KEYS[lk], 'lease_id', lease_id, 'principal', ARGV[2],
      'request_id', ARGV[3], 'pool', ARGV[4], 'key_id', key_id, 'account', account,
      'model', ARGV[5], 'units', ARGV[6], 'created_at', ARGV[7], 'expires_at', ARGV[8],
      'status', 'active', 'refunded', '0', 'windows', names, 'ik', ARGV[12],
      'key_version', version)
    redis.call('PEXPIRE', KEYS[lk], ARGV[9])
    redis.call('ZADD', KEYS[lk + 1], ARGV[8], lease_id)
    return {'grant', tostring(c), out}
  end
end
return {'reject', seen}
