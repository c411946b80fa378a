-- reserve: check the pool's budget (priority reserve, low-priority pacing), then the health
-- and every window of each candidate in order, charge the first candidate that is usable
-- and fits and record its lease, all or nothing; on a single Redis it also keeps the
-- request_id's idempotency record, in the same call.
--
-- KEYS
--   ...  the idempotency key first, only when ARGV[1] == '1'; then per candidate: its new
--        lease (P:{T}:lease:<id>), the account's active-lease index (P:{T}:active),
--        window-ends index (P:{T}:ends) and health records (P:{T}:health), then each of its
--        windows (P:{T}:w:<name>); all of one candidate in its account's slot {T}; then the
--        budget's day windows (P:{T}:w:<name>, ARGV[15] of them; on a cluster only those in
--        this call's slot)
-- ARGV
--   1    '1' when this call keeps the idempotency record in KEYS[1], else '0'
--   2    principal
--   3    request_id ('' = none)
--   4    pool
--   5    model
--   6    units to charge
--   7    created_at (epoch seconds, the broker's clock; also "now" for health)
--   8    expires_at (epoch seconds)
--   9    the lease's TTL in ms (also the idempotency record's)
--   10   an idempotency value found stale (its lease is gone): overwritten, not reported
--        ('' = none)
--   11   the number of candidates
--   12   the idempotency key's name, kept in the lease as `ik` ('' without a request_id)
--   13   until when a half-open key's probe holds it (epoch seconds)
--   14   the budget's units allowed in all ('' = no budget)
--   15   the number of budget windows in KEYS
--   16   units counted in budget windows outside this call (a cluster's other slots)
--   ...  per budget window its cap (a count above it counts as the cap); then per
--        candidate: lease_id, key_id, account, its window names as JSON, its key's and its
--        account's health subjects, its key's KV version, its account's paid-use subject
--        ('' = not checked: the model is free), n, then n x (window name, limit, ends_at,
--        window TTL in ms)
-- Returns {'claimed', value} when KEYS[1] already names a lease (the caller replays that
-- lease, or calls again with the value in ARGV[10] when it is gone); {'budget', units
-- counted} when the budget has no room; {'grant', candidate number, {name, count, ...}} of
-- the charged windows; or {'reject', {name, count, ...}, {subject, health JSON, ...}} of
-- every window and health record seen.
local k = 1
if ARGV[1] == '1' then
  k = 2
  local prev = redis.call('GET', KEYS[1])
  if prev and prev ~= ARGV[10] then return {'claimed', prev} end
end
local units = tonumber(ARGV[6])
local now = tonumber(ARGV[7])
local ncand = tonumber(ARGV[11])
local nbudget = tonumber(ARGV[15])
local a = 17
if ARGV[14] ~= '' then
  -- the budget windows follow every candidate's keys: count the candidates' keys first
  local bk, scan = k, a + nbudget
  for _ = 1, ncand do
    local n = tonumber(ARGV[scan + 8])
    bk = bk + 4 + n
    scan = scan + 9 + 4 * n
  end
  local spent = tonumber(ARGV[16])
  for b = 1, nbudget do
    local used = tonumber(redis.call('GET', KEYS[bk + b - 1])) or 0
    local cap = tonumber(ARGV[a + b - 1])
    if used > cap then used = cap end
    spent = spent + used
  end
  if spent + units > tonumber(ARGV[14]) then return {'budget', tostring(spent)} end
end
a = a + nbudget
local seen, hseen = {}, {}
for c = 1, ncand do
  local lease_id, key_id, account, names, ksub, asub, version, psub, n = ARGV[a],
    ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7],
    tonumber(ARGV[a + 8])
  a = a + 9
  local lk = k  -- KEYS[lk] the lease, KEYS[lk + 1] active, KEYS[lk + 2] ends, KEYS[lk + 3] health
  k = k + 4
  -- health: a disabled key, a key whose circuit is open (or probing), a cooling account
  local fits, probe = true, nil
  local own = redis.call('HGET', KEYS[lk + 3], ksub)
  local acct = redis.call('HGET', KEYS[lk + 3], asub)
  if own then
    hseen[#hseen + 1] = ksub
    hseen[#hseen + 1] = own
    local h = cjson.decode(own)
    if h.state == 'disabled' or (h.state ~= 'healthy' and tonumber(h['until']) > now) then
      fits = false
    elseif h.state == 'circuit_open' then
      probe = h.failures  -- half-open: this lease is its one probe
    end
  end
  if acct then
    hseen[#hseen + 1] = asub
    hseen[#hseen + 1] = acct
    local h = cjson.decode(acct)
    if h.state == 'cooling_down' and tonumber(h['until']) > now then fits = false end
  end
  -- the account's paid use (in-flight budget cooldown, credit stop), for a paid model
  if psub ~= '' then
    local paid = redis.call('HGET', KEYS[lk + 3], psub)
    if paid then
      hseen[#hseen + 1] = psub
      hseen[#hseen + 1] = paid
      local h = cjson.decode(paid)
      local pu = tonumber(h['until'])
      if h.state == 'disabled' or (h.state ~= 'healthy' and pu > now) then
        fits = false
      elseif h.reason == 'in_flight_budget' and h.failures > 0 and now < pu + 60 then
        -- the learned in-flight cap (IN_FLIGHT_CAP_SECONDS = 60 after the cooldown)
        if redis.call('ZCOUNT', KEYS[lk + 1], '(' .. ARGV[7], '+inf') >= h.failures then
          fits = false
        end
      end
    end
  end
  local wins = {}
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
    if probe then
      redis.call('HSET', KEYS[lk + 3], ksub, '{"state": "circuit_open", "reason": "probe", '
        .. '"until": ' .. ARGV[13] .. ', "failures": ' .. string.format('%d', probe) .. '}')
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
return {'reject', seen, hseen}
