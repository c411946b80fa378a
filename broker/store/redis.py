"""Redis state store: any number of broker replicas share one Redis.

Every reservation is ONE Lua script call (EVALSHA through redis-py's
``register_script``, which re-loads the script after a Redis restart answers
NOSCRIPT): the idempotency check, the check of every window of each candidate
in order, the charge of the first candidate that fits, the lease record, its
place in the active-lease index and the idempotency record happen atomically
in one round trip. Python never reads a count and writes it back, so replicas
cannot over-grant whatever their cached counts say.

Layout (``P`` is the configured prefix, ``kb`` by default)::

    P:{acct:<account>}:w:<window name>   a window's count; expires at its end + a margin
    P:win         hash   window name -> the key holding its count (for reads by name)
    P:win:ends    zset   window name, scored by when the window ends (live/prune)
    P:lease:<id>  hash   one lease; expires ``retention`` after it ends
    P:idem:<n>:<principal>:<request_id>  the lease id a request_id was granted
    P:active      zset   active lease ids, scored by expiry (expire_due)
    P:done        zset   ended lease ids, scored by when they ended (prune)
    P:health, P:stats    hashes of JSON by subject / key_id
    P:usage:{d:<day>}:<row>   one usage row (key, account, model, principal as JSON):
                              a hash of HINCRBY/HINCRBYFLOAT counters and latency buckets
    P:usage:{d:<day>}         the day's set of rows;  P:usage:days  the days (by name)

Expiry is relative (PEXPIRE), computed from the broker's injected clock, never
from Redis's own clock: a test clock in the past must not make Redis drop a
live window. ``prune`` deletes ended windows and old leases by the broker's
clock; the Redis TTLs are the safety net when no broker runs.

Cluster and hash tags. All counters of one account (its day and minute windows
and the windows of its keys) share the hash tag ``{acct:<account>}``, so they
live in one slot. A reservation offering candidates from several accounts
touches several slots, and so do the lease and idempotency records, which are
looked up by lease id and by (principal, request_id) and cannot carry an
account's tag. On Redis Cluster the store would therefore have to call the
script once per account group, and then a request_id retried while the
candidates' order changed could be granted once per account, and a lease could
not be found by its id without a directory written outside the script. This
store does not do that: it speaks to a single Redis node (or a primary with
replicas or Sentinel) and sends ALL candidates, of every account, in ONE
script, so idempotency and the lease record stay atomic with the charge.
Running on Cluster needs per-account scripts plus an idempotency claim and a
lease directory (see docs/redis.md); the per-account tags keep that door open.

Failures: every redis-py error (connection refused or lost, timeouts,
``ResponseError``, ...) becomes ``BackendUnavailable`` in one place,
``_translate_errors``. redis-py's retries are off, so a call fails within the
configured socket/connect timeout (under overload it may first queue, at most as
long again, for one of the process's pooled connections), and fails closed: no
answer from the script means no grant. A script that ran but whose answer was lost leaves a recorded
lease nobody holds; it expires at its TTL with its units spent, never an
over-grant. The pool checks each connection before use and reconnects, so the
service resumes by itself when Redis returns.

No secret ever reaches Redis: the store is never given one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..errors import BackendUnavailable, LeaseNotActive, LeaseNotFound
from ..models import (
    LATENCY_BUCKETS_MS,
    Health,
    HealthState,
    KeyStats,
    LeaseRecord,
    LeaseStatus,
    UsageReport,
    UsageRow,
    latency_bucket,
)
from .base import Rejection, Reservation, ReserveRequest

__all__ = ["RedisStore"]

_DAY = 86400.0
_ACCT_WINDOW = re.compile(r"acct:(.+):(?:d:\d{4}-\d{2}-\d{2}|m:\d{4}-\d{2}-\d{2}T\d{2}:\d{2})")
_BATCH = 1000  # names or leases one maintenance script handles per call

# KEYS: 1 idempotency, 2 lease, 3 active zset, 4 window index, 5 window ends, 6.. the
#       preferred key of each window of each candidate, in order.
# ARGV: 1 lease_id, 2 principal, 3 request_id, 4 pool, 5 model, 6 units, 7 created_at,
#       8 expires_at, 9 lease ttl ms, 10 lease key prefix, 11 candidate count, then per
#       candidate: key_id, account, windows json, n, and n x (name, limit, ends_at, ttl ms).
_RESERVE = """
local rid = ARGV[3]
if rid ~= '' then
  local prev = redis.call('GET', KEYS[1])
  if prev then
    local lease = redis.call('HGETALL', ARGV[10] .. prev)
    if #lease > 0 then return {'replay', lease} end
  end
end
local units = tonumber(ARGV[6])
local seen = {}
local a, k = 12, 6
for c = 1, tonumber(ARGV[11]) do
  local key_id, account, names, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  a = a + 4
  local wins, fits = {}, true
  for w = 1, n do
    local name, limit, ends, ttl = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3]
    a = a + 4
    local key = KEYS[k]
    k = k + 1
    local home = redis.call('HGET', KEYS[4], name)
    local cur = redis.call('GET', home or key)
    local used = tonumber(cur) or 0
    seen[#seen + 1] = name
    seen[#seen + 1] = used
    if used + units > limit then fits = false end
    wins[w] = {name, key, home, cur, used, ends, ttl}
  end
  if fits then
    local out = {}
    for _, x in ipairs(wins) do
      local name, key, home, cur, used, ends, ttl = unpack(x)
      local now_used
      if home and home ~= key then
        -- The window was counted elsewhere (the key changed account): move its count.
        redis.call('DEL', home)
        now_used = used + units
        redis.call('SET', key, now_used, 'PX', ttl)
      elseif cur then
        now_used = redis.call('INCRBY', key, units)
      else
        now_used = units
        redis.call('SET', key, units, 'PX', ttl)
      end
      if not (home == key and cur) then
        redis.call('HSET', KEYS[4], name, key)
        redis.call('ZADD', KEYS[5], ends, name)
      end
      out[#out + 1] = name
      out[#out + 1] = now_used
    end
    local ik = ''
    if rid ~= '' then
      ik = KEYS[1]
      redis.call('SET', ik, ARGV[1], 'PX', ARGV[9])
    end
    redis.call('HSET', KEYS[2], 'lease_id', ARGV[1], 'principal', ARGV[2], 'request_id', rid,
      'pool', ARGV[4], 'key_id', key_id, 'account', account, 'model', ARGV[5],
      'units', ARGV[6], 'created_at', ARGV[7], 'expires_at', ARGV[8], 'status', 'active',
      'refunded', '0', 'windows', names, 'ik', ik)
    redis.call('PEXPIRE', KEYS[2], ARGV[9])
    redis.call('ZADD', KEYS[3], ARGV[8], ARGV[1])
    return {'grant', tostring(c), out}
  end
end
return {'reject', seen}
"""

# KEYS: 1 lease, 2 active, 3 done, 4 window index. ARGV: 1 lease_id, 2 used (1/0), 3 now,
#       4 keep ms (how long an ended lease and its idempotency record stay).
_COMPLETE = """
local f = redis.call('HMGET', KEYS[1], 'status', 'expires_at', 'units', 'windows', 'ik')
if not f[1] then return {'missing'} end
if f[1] ~= 'active' then return {'same', redis.call('HGETALL', KEYS[1])} end
local status, refund = 'completed', ARGV[2] == '0'
if tonumber(f[2]) <= tonumber(ARGV[3]) then status, refund = 'expired', false end
if refund then
  local units = tonumber(f[3])
  for _, name in ipairs(cjson.decode(f[4])) do
    local home = redis.call('HGET', KEYS[4], name)
    if home then
      local v = tonumber(redis.call('GET', home))
      if v then
        v = v - units
        if v < 0 then v = 0 end
        redis.call('SET', home, v, 'KEEPTTL')
      end
    end
  end
end
redis.call('HSET', KEYS[1], 'status', status, 'refunded', refund and '1' or '0',
  'finished_at', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if f[5] and f[5] ~= '' then redis.call('PEXPIRE', f[5], ARGV[4]) end
return {'changed', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: 1 lease, 2 active. ARGV: 1 lease_id, 2 new expires_at, 3 now, 4 ttl ms.
_RENEW = """
local f = redis.call('HMGET', KEYS[1], 'status', 'expires_at', 'ik')
if not f[1] then return {'missing'} end
if f[1] == 'active' and tonumber(f[2]) > tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'expires_at', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  if f[3] and f[3] ~= '' then redis.call('PEXPIRE', f[3], ARGV[4]) end
  return {'renewed', redis.call('HGETALL', KEYS[1])}
end
return {'inactive', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: 1 active, 2 done. ARGV: 1 now, 2 limit, 3 lease key prefix, 4 keep ms.
_EXPIRE_DUE = """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])) do
  local lk = ARGV[3] .. id
  redis.call('ZREM', KEYS[1], id)
  local f = redis.call('HMGET', lk, 'status', 'ik')
  if f[1] == 'active' then
    redis.call('HSET', lk, 'status', 'expired', 'finished_at', ARGV[1])
    redis.call('ZADD', KEYS[2], ARGV[1], id)
    redis.call('PEXPIRE', lk, ARGV[4])
    if f[2] and f[2] ~= '' then redis.call('PEXPIRE', f[2], ARGV[4]) end
    out[#out + 1] = redis.call('HGETALL', lk)
  end
end
return out
"""

# KEYS: 1 window index. ARGV: window names. Returns their counts, in order.
_COUNTERS = """
local out = {}
for i, name in ipairs(ARGV) do
  local home = redis.call('HGET', KEYS[1], name)
  out[i] = home and tonumber(redis.call('GET', home)) or 0
end
return out
"""

# KEYS: 1 window index, 2 window ends. ARGV: 1 now, 2 offset, 3 count.
_LIVE = """
local out = {}
local names = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'LIMIT', ARGV[2], ARGV[3])
for _, name in ipairs(names) do
  local home = redis.call('HGET', KEYS[1], name)
  local v = home and redis.call('GET', home)
  if v then
    out[#out + 1] = name
    out[#out + 1] = tonumber(v)
  end
end
return {#names, out}
"""

# KEYS: 1 window index, 2 window ends, 3 the key to use if the window is new.
# ARGV: 1 name, 2 used, 3 ends_at, 4 ttl ms.
_SET_COUNTER = """
local home = redis.call('HGET', KEYS[1], ARGV[1])
if home and redis.call('EXISTS', home) == 1 then
  redis.call('SET', home, ARGV[2], 'KEEPTTL')
  return 0
end
home = home or KEYS[3]
redis.call('SET', home, ARGV[2], 'PX', ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], home)
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

# KEYS: 1 active. ARGV: 1 now, 2 lease key prefix. Returns key_id, count pairs.
_ACTIVE = """
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
"""

# KEYS: 1 window index, 2 window ends, 3 done, 4 usage days. ARGV: 1 now, 2 cutoff, 3 batch,
#       4 lease prefix, 5 oldest usage day kept, 6 usage key prefix. Drops at most one usage day.
_PRUNE = """
local names = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, name in ipairs(names) do
  local home = redis.call('HGET', KEYS[1], name)
  if home then redis.call('DEL', home) end
  redis.call('HDEL', KEYS[1], name)
  redis.call('ZREM', KEYS[2], name)
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
  local lk = ARGV[4] .. id
  local ik = redis.call('HGET', lk, 'ik')
  if ik and ik ~= '' and redis.call('GET', ik) == id then redis.call('DEL', ik) end
  redis.call('DEL', lk)
  redis.call('ZREM', KEYS[3], id)
end
local rows = 0
local days = redis.call('ZRANGEBYLEX', KEYS[4], '-', '(' .. ARGV[5], 'LIMIT', 0, 1)
for _, day in ipairs(days) do
  local index = ARGV[6] .. day .. '}'
  for _, row in ipairs(redis.call('SMEMBERS', index)) do
    redis.call('DEL', index .. ':' .. row)
    rows = rows + 1
  end
  redis.call('DEL', index)
  redis.call('ZREM', KEYS[4], day)
end
return {#names, #ids, #days, rows}
"""

# KEYS: 1 usage days. ARGV: 1 first day, 2 last day, 3 usage key prefix.
# Returns day, row, fields for every row of those days.
_USAGE = """
local out = {}
for _, day in ipairs(redis.call('ZRANGEBYLEX', KEYS[1], '[' .. ARGV[1], '[' .. ARGV[2])) do
  local index = ARGV[3] .. day .. '}'
  for _, row in ipairs(redis.call('SMEMBERS', index)) do
    out[#out + 1] = {day, row, redis.call('HGETALL', index .. ':' .. row)}
  end
end
return out
"""


@contextlib.contextmanager
def _translate_errors() -> Iterator[None]:
    """The one place redis-py's errors become BackendUnavailable (the message holds no URL)."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise BackendUnavailable(f"redis store: {type(exc).__name__}: {exc}") from None


def _pairs(flat: Sequence[Any]) -> dict[str, Any]:
    return {str(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def _lease(flat: Sequence[Any]) -> LeaseRecord:
    f = _pairs(flat)
    return LeaseRecord(
        lease_id=f["lease_id"], principal=f["principal"], request_id=f["request_id"],
        pool=f["pool"], key_id=f["key_id"], account=f["account"], model=f["model"],
        units=int(f["units"]), created_at=float(f["created_at"]),
        expires_at=float(f["expires_at"]), status=LeaseStatus(f["status"]),
        refunded=f["refunded"] == "1", windows=tuple(json.loads(f["windows"])),
    )


class RedisStore:
    """StateStore on one Redis (redis-py asyncio). See the module docstring for the layout.

    Args:
        url: ``redis://`` or ``rediss://`` (TLS) URL; a password may be in it.
        timeout: socket and connect timeout in seconds, and the longest a call queues for
            a free connection; past either it fails as BackendUnavailable.
        prefix: namespace of every key this store writes.
        retention: seconds ended leases and their idempotency records are kept
            (Redis drops them by itself after at least a day; ``prune`` sooner).
        window_margin: seconds a window's count outlives the window's end in Redis.
        max_connections: connections this process opens to Redis at most; more calls
            in flight queue, first come first served.
    """

    def __init__(self, url: str, *, timeout: float = 0.5, prefix: str = "kb",
                 retention: float = 2 * _DAY, window_margin: float = 3600.0,
                 max_connections: int = 64) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError("redis prefix must be non-empty and hold no { or }")
        if timeout <= 0:
            raise ValueError("redis timeout must be > 0")
        self._p = prefix
        self._keep_ms = int(max(retention, _DAY) * 1000)  # TTL safety net, at least 24h
        self._margin = window_margin
        self._last_now = time.time()  # the broker clock's latest reading, for set_counter
        # No retries: a failed call fails within the timeout and fails closed. The pool
        # checks a connection before use and reconnects, which covers a Redis restart.
        pool = aioredis.ConnectionPool.from_url(
            url, max_connections=max_connections, decode_responses=True,
            socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), client_name="keybroker")
        self._redis = aioredis.Redis.from_pool(pool)
        # Redis runs one script at a time, so more connections add no throughput. Calls
        # beyond the pool queue here in FIFO order (the pool itself would refuse them, and
        # its own waiting is not first-come first-served) for at most `timeout`.
        self._slots = asyncio.Semaphore(max_connections)
        self._timeout = timeout
        register = self._redis.register_script
        self._reserve, self._complete, self._renew = (
            register(_RESERVE), register(_COMPLETE), register(_RENEW))
        self._expire_due, self._counters, self._live = (
            register(_EXPIRE_DUE), register(_COUNTERS), register(_LIVE))
        self._set_counter, self._active, self._prune, self._usage = (
            register(_SET_COUNTER), register(_ACTIVE), register(_PRUNE), register(_USAGE))

    # -- key names ---------------------------------------------------------------------------

    def _k(self, suffix: str) -> str:
        return f"{self._p}:{suffix}"

    def _window_key(self, name: str, account: str | None = None) -> str:
        """Where a window's count lives: under its account's hash tag."""
        if account is None:
            m = _ACCT_WINDOW.fullmatch(name)
            tag = f"acct:{m.group(1)}" if m else f"w:{name}"  # unknown: the reserve moves it
        else:
            tag = f"acct:{account}"
        return f"{self._p}:{{{tag}}}:w:{name}"

    def _idem_key(self, principal: str, request_id: str) -> str:
        return f"{self._p}:idem:{len(principal)}:{principal}:{request_id}"

    def _ttl_ms(self, ends_at: float, now: float, margin: float) -> int:
        return max(int((ends_at - now + margin) * 1000), 1000)

    def _seen(self, now: float) -> None:
        self._last_now = now

    @contextlib.asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """A connection slot (waiting at most the timeout) and the error translation."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise BackendUnavailable("redis store: no free connection within the timeout "
                                     "(more calls in flight than the pool serves)") from None
        try:
            with _translate_errors():
                yield
        finally:
            self._slots.release()

    # -- StateStore --------------------------------------------------------------------------

    async def reserve(self, request: ReserveRequest) -> Reservation | Rejection:
        now = request.created_at
        self._seen(now)
        lease_ttl = self._ttl_ms(request.expires_at, now, self._keep_ms / 1000)
        keys = [self._idem_key(request.principal, request.request_id),
                self._k(f"lease:{request.lease_id}"), self._k("active"), self._k("win"),
                self._k("win:ends")]
        args: list[str | int] = [
            request.lease_id, request.principal, request.request_id, request.pool,
            request.model, request.units, repr(request.created_at), repr(request.expires_at),
            lease_ttl, self._k("lease:"), len(request.candidates)]
        for cand in request.candidates:
            args += [cand.key_id, cand.account, json.dumps([w.name for w in cand.windows]),
                     len(cand.windows)]
            for w in cand.windows:
                keys.append(self._window_key(w.name, cand.account))
                args += [w.name, w.limit, repr(w.ends_at), self._ttl_ms(w.ends_at, now, self._margin)]
        async with self._call():
            result = await self._reserve(keys=keys, args=args)
        if result[0] == "replay":
            return Reservation(lease=_lease(result[1]), used={}, replay=True)
        if result[0] == "reject":
            return Rejection(used={n: int(u) for n, u in _pairs(result[1]).items()})
        cand = request.candidates[int(result[1]) - 1]
        lease = LeaseRecord(
            lease_id=request.lease_id, principal=request.principal,
            request_id=request.request_id, pool=request.pool, key_id=cand.key_id,
            account=cand.account, model=request.model, units=request.units,
            created_at=request.created_at, expires_at=request.expires_at,
            status=LeaseStatus.ACTIVE, refunded=False, windows=tuple(w.name for w in cand.windows))
        return Reservation(lease=lease, used={n: int(u) for n, u in _pairs(result[2]).items()})

    async def get_lease(self, lease_id: str) -> LeaseRecord | None:
        async with self._call():
            fields = await self._redis.hgetall(self._k(f"lease:{lease_id}"))
        if not fields:
            return None
        return _lease([x for kv in fields.items() for x in kv])

    async def renew(self, lease_id: str, expires_at: float, now: float) -> LeaseRecord:
        self._seen(now)
        ttl = self._ttl_ms(expires_at, now, self._keep_ms / 1000)
        async with self._call():
            result = await self._renew(keys=[self._k(f"lease:{lease_id}"), self._k("active")],
                                       args=[lease_id, repr(expires_at), repr(now), ttl])
        if result[0] == "missing":
            raise LeaseNotFound(f"lease {lease_id} not found")
        if result[0] == "inactive":
            raise LeaseNotActive(f"lease {lease_id} is no longer active")
        return _lease(result[1])

    async def complete(self, lease_id: str, used: bool, now: float) -> tuple[LeaseRecord, bool]:
        self._seen(now)
        async with self._call():
            result = await self._complete(
                keys=[self._k(f"lease:{lease_id}"), self._k("active"), self._k("done"),
                      self._k("win")],
                args=[lease_id, int(used), repr(now), self._keep_ms])
        if result[0] == "missing":
            raise LeaseNotFound(f"lease {lease_id} not found")
        return _lease(result[1]), result[0] == "changed"

    async def expire_due(self, now: float, limit: int = 500) -> list[LeaseRecord]:
        self._seen(now)
        async with self._call():
            rows = await self._expire_due(keys=[self._k("active"), self._k("done")],
                                          args=[repr(now), limit, self._k("lease:"),
                                                self._keep_ms])
        return [_lease(r) for r in rows]

    async def counters(self, names: Sequence[str]) -> dict[str, int]:
        out = dict.fromkeys(names, 0)
        unique = list(out)
        for i in range(0, len(unique), _BATCH):
            chunk = unique[i:i + _BATCH]
            async with self._call():
                counts = await self._counters(keys=[self._k("win")], args=chunk)
            out.update(zip(chunk, (int(c) for c in counts), strict=True))
        return out

    async def live_counters(self, now: float) -> dict[str, int]:
        self._seen(now)
        out: dict[str, int] = {}
        offset = 0
        while True:
            async with self._call():
                scanned, flat = await self._live(keys=[self._k("win"), self._k("win:ends")],
                                                 args=[repr(now), offset, _BATCH])
            out.update((n, int(u)) for n, u in _pairs(flat).items())
            if int(scanned) < _BATCH:
                return out
            offset += _BATCH

    async def set_counter(self, name: str, used: int, expires_at: float) -> None:
        # The protocol gives no `now`: the broker clock's latest reading stands in for it.
        ttl = self._ttl_ms(expires_at, self._last_now, self._margin)
        async with self._call():
            await self._set_counter(
                keys=[self._k("win"), self._k("win:ends"), self._window_key(name)],
                args=[name, used, repr(expires_at), ttl])

    async def health(self) -> dict[str, Health]:
        async with self._call():
            rows = await self._redis.hgetall(self._k("health"))
        out = {}
        for subject, raw in rows.items():
            d = json.loads(raw)
            out[str(subject)] = Health(HealthState(d["state"]), d["reason"], float(d["until"]),
                                       int(d["failures"]))
        return out

    async def put_health(self, subject: str, health: Health) -> None:
        async with self._call():
            if health == Health():
                await self._redis.hdel(self._k("health"), subject)
            else:
                await self._redis.hset(self._k("health"), subject, json.dumps({
                    "state": health.state.value, "reason": health.reason,
                    "until": health.until, "failures": health.failures}))

    async def record_usage(self, lease: LeaseRecord, report: UsageReport, now: float) -> None:
        self._seen(now)
        day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
        row = json.dumps([lease.key_id, lease.account, report.model or lease.model,
                          lease.principal], separators=(",", ":"))
        index = self._k(f"usage:{{d:{day}}}")
        key = f"{index}:{row}"
        failed = int(not 200 <= report.http_status < 300)
        # MULTI/EXEC: all of it or none.
        async with self._call(), self._redis.pipeline(transaction=True) as tx:
            tx.hincrby(key, "requests", 1)
            tx.hincrby(key, "failures", failed)
            tx.hincrby(key, "prompt_tokens", report.prompt_tokens)
            tx.hincrby(key, "completion_tokens", report.completion_tokens)
            tx.hincrbyfloat(key, "cost", report.cost)
            tx.hincrby(key, "latency_ms_sum", report.latency_ms)
            tx.hincrby(key, f"b{latency_bucket(report.latency_ms)}", 1)
            tx.sadd(index, row)
            tx.zadd(self._k("usage:days"), {day: 0})
            await tx.execute()

    async def usage(self, since_day: str, until_day: str) -> list[UsageRow]:
        async with self._call():
            found = await self._usage(keys=[self._k("usage:days")],
                                      args=[since_day, until_day, self._k("usage:{d:")])
        rows = []
        for day, row, flat in found:
            key_id, account, model, principal = json.loads(row)
            f = _pairs(flat)
            rows.append(UsageRow(
                day=day, key_id=key_id, account=account, model=model, principal=principal,
                requests=int(f.get("requests", 0)), failures=int(f.get("failures", 0)),
                prompt_tokens=int(f.get("prompt_tokens", 0)),
                completion_tokens=int(f.get("completion_tokens", 0)),
                cost=float(f.get("cost", 0.0)), latency_ms_sum=int(f.get("latency_ms_sum", 0)),
                latency_buckets=tuple(int(f.get(f"b{i}", 0))
                                      for i in range(len(LATENCY_BUCKETS_MS) + 1))))
        rows.sort(key=lambda r: (r.day, r.key_id, r.account, r.model, r.principal))
        return rows

    async def key_stats(self) -> dict[str, KeyStats]:
        async with self._call():
            rows = await self._redis.hgetall(self._k("stats"))
        return {str(kid): KeyStats(*(float(x) for x in json.loads(raw)))
                for kid, raw in rows.items()}

    async def put_key_stats(self, key_id: str, stats: KeyStats) -> None:
        async with self._call():
            await self._redis.hset(self._k("stats"), key_id, json.dumps(
                [stats.successes, stats.failures, stats.latency_ms, stats.updated_at]))

    async def active_leases(self, now: float) -> Mapping[str, int]:
        self._seen(now)
        async with self._call():
            flat = await self._active(keys=[self._k("active")], args=[repr(now), self._k("lease:")])
        return {k: int(v) for k, v in _pairs(flat).items()}

    async def prune(self, now: float, retention_seconds: float,
                    usage_retention_seconds: float = 30 * _DAY) -> int:
        self._seen(now)
        oldest = datetime.fromtimestamp(now - usage_retention_seconds, UTC).strftime("%Y-%m-%d")
        total = 0
        while True:
            async with self._call():
                windows, leases, days, rows = await self._prune(
                    keys=[self._k("win"), self._k("win:ends"), self._k("done"),
                          self._k("usage:days")],
                    args=[repr(now), repr(now - retention_seconds), _BATCH, self._k("lease:"),
                          oldest, self._k("usage:{d:")])
            total += int(windows) + int(leases) + int(rows)
            if int(windows) < _BATCH and int(leases) < _BATCH and not int(days):
                return total

    async def close(self) -> None:
        """Close the pool; bounded, since a connection left mid-command by a cancelled call
        can make redis-py's disconnect wait forever, and shutdown must not hang."""
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(max(self._timeout, 0.1) * 4):
                await self._redis.aclose()
