"""Redis state store: any number of broker replicas share one Redis or one Redis Cluster.

Every reservation is ONE Lua script call (EVALSHA through redis-py's
``register_script``, which re-loads the script after a Redis restart answers
NOSCRIPT): the check of every window of each candidate in order, the charge of
the first candidate that fits, the lease record and its place in the
active-lease index happen atomically in one round trip (on a single Redis the
idempotency check and record are in the same script). Python never reads a
count and writes it back, so replicas cannot over-grant whatever their cached
counts say.

Layout (``P`` is the configured prefix, ``kb`` by default; ``T`` is an account's
slot tag, the first 12 hex digits of the BLAKE2b hash of its name)::

    P:{T}:w:<window name>  a window's count; expires at the window's end + a margin
    P:{T}:ends     zset   the account's window names, scored by when they end
    P:{T}:lease:<id>  hash  one lease; expires ``retention`` after it ends
    P:{T}:active   zset   the account's active lease ids, scored by expiry
    P:{T}:done     zset   its ended lease ids, scored by when they ended
    P:accounts     hash   T -> account name: the accounts to sweep, list and prune
    P:idem:<n>:<principal>:<request_id>  the lease id a request_id was granted
    P:health, P:stats    hashes of JSON by subject / key_id
    P:usage:{d:<day>}:<row>   one usage row (key, account, model, principal as JSON):
                              a hash of counters and latency buckets
    P:usage:{d:<day>}         the day's set of rows;  P:usage:days  the days (by name)

Slots. Everything one reservation touches in an account shares the hash tag
``{T}``, and every per-key window is named with its key's account (see
``engine.key_window``), so a reservation over one account's keys is one script on
one slot. A lease id ends in its account's tag (the store puts it in the last 12
hex digits of the ``ls_`` id the engine proposes), so RenewLease and Complete find
the lease's slot from the id alone. The tag is a hash, not the name, so any
account name (braces included) gives a valid tag of fixed length.

Single Redis (a primary with replicas or Sentinel included): one script gets all
candidates, of every account, and the idempotency record: exactly one round trip.

Redis Cluster (``cluster=True``): candidates are grouped by account and each group
is one script on its slot, tried in order; the first group nearly always grants,
so a LeaseKey is one round trip. A request_id is claimed first on its own key
(a script: set it if absent, one more round trip) with the lease id the first group
would grant and a deadline, 6 x the timeout ahead by Redis's own clock (``TIME``);
before each further group the claim is moved to that group's lease id (and its
deadline renewed); when no group grants, the claim is removed. A retry that finds a
claim replays the lease if it exists, waits (up to the timeout) while the claim's
deadline has not passed, and takes the claim over once it has (its holder died).
Every call of the holder ends within twice the timeout (a wait for a connection,
then the socket), so only a holder frozen for longer than the slack between those
bounds and the deadline, that then resumes, could grant that request_id a second
lease; quotas stay exact either way, since every grant is counted.

Expiry is relative (PEXPIRE), computed from the broker's injected clock, never
from Redis's own clock: a test clock in the past must not make Redis drop a
live window. ``prune`` deletes ended windows and old leases by the broker's
clock; the Redis TTLs are the safety net when no broker runs. Idempotency records
expire ``retention`` after their lease's expiry (RenewLease extends them).

Failures: every redis-py error (connection refused or lost, timeouts,
``ResponseError``, cluster errors, ...) becomes ``BackendUnavailable`` in one place,
``_translate_errors``. redis-py's retries are off, so a call fails within the
configured socket/connect timeout (under overload it may first queue, at most as
long again, for one of the process's pooled connections), and fails closed: no
answer from the script means no grant. A script that ran but whose answer was lost
leaves a recorded lease nobody holds; it expires at its TTL with its units spent,
never an over-grant. The pool checks each connection before use and reconnects,
so the service resumes by itself when Redis returns.

No secret ever reaches Redis: the store is never given one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

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
from .base import TAG_HEX, Candidate, Rejection, Reservation, ReserveRequest, account_tag, lease_id_in

__all__ = ["RedisStore"]

_DAY = 86400.0
_BATCH = 1000  # names or leases one maintenance script handles per call

# KEYS: [idempotency key when ARGV[1] == '1'], then per candidate: its lease key, the
#       account's active zset and window-ends zset, then the key of each of its windows.
# ARGV: 1 idempotency in this script ('1'/'0'), 2 principal, 3 request_id, 4 pool, 5 model,
#       6 units, 7 created_at, 8 expires_at, 9 lease ttl ms, 10 prefix, 11 candidate count,
#       12 the idempotency key's name ('' without a request_id), then per candidate:
#       lease_id, key_id, account, windows json, n, and n x (name, limit, ends_at, ttl ms).
_RESERVE = """
local k = 1
if ARGV[1] == '1' then
  k = 2
  local prev = redis.call('GET', KEYS[1])
  if prev then
    local id = string.match(prev, '^%S+')
    local lease = redis.call('HGETALL', ARGV[10] .. ':{' .. string.sub(id, -12) .. '}:lease:' .. id)
    if #lease > 0 then return {'replay', lease} end
  end
end
local units = tonumber(ARGV[6])
local seen = {}
local a = 13
for c = 1, tonumber(ARGV[11]) do
  local lease_id, key_id, account, names, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
    tonumber(ARGV[a + 4])
  a = a + 5
  local lk, ak, ek = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  k = k + 3
  local wins, fits = {}, true
  for w = 1, n do
    local name, limit, ends, ttl = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3]
    a = a + 4
    local key = KEYS[k]
    k = k + 1
    local used = tonumber(redis.call('GET', key)) or 0
    seen[#seen + 1] = name
    seen[#seen + 1] = used
    if used + units > limit then fits = false end
    wins[w] = {name, key, ends, ttl}
  end
  if fits then
    local out = {}
    for _, x in ipairs(wins) do
      local name, key, ends, ttl = unpack(x)
      local now_used = redis.call('INCRBY', key, units)
      if now_used == units then
        redis.call('PEXPIRE', key, ttl)
        redis.call('ZADD', ek, ends, name)
      end
      out[#out + 1] = name
      out[#out + 1] = now_used
    end
    if ARGV[1] == '1' and ARGV[12] ~= '' then
      redis.call('SET', KEYS[1], lease_id, 'PX', ARGV[9])
    end
    redis.call('HSET', lk, 'lease_id', lease_id, 'principal', ARGV[2], 'request_id', ARGV[3],
      'pool', ARGV[4], 'key_id', key_id, 'account', account, 'model', ARGV[5],
      'units', ARGV[6], 'created_at', ARGV[7], 'expires_at', ARGV[8], 'status', 'active',
      'refunded', '0', 'windows', names, 'ik', ARGV[12])
    redis.call('PEXPIRE', lk, ARGV[9])
    redis.call('ZADD', ak, ARGV[8], lease_id)
    return {'grant', tostring(c), out}
  end
end
return {'reject', seen}
"""

# KEYS: 1 idempotency key. ARGV: 1 the lease id to claim it for ('' = remove the claim),
#       2 ttl ms, 3 the value the caller holds ('' = none), 4 the holder's budget in ms.
# A claim's value is "<lease id> <deadline>", the deadline in ms by Redis's own clock.
# Returns {value} when the caller now holds the claim with that value, {found, stale 1/0}
# when it is someone else's (nothing changed), false when it was removed or is absent.
_CLAIM = """
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
"""

# KEYS: 1 lease, 2 active, 3 done. ARGV: 1 lease_id, 2 used (1/0), 3 now,
#       4 keep ms (how long an ended lease stays), 5 window key prefix of its account.
_COMPLETE = """
local f = redis.call('HMGET', KEYS[1], 'status', 'expires_at', 'units', 'windows')
if not f[1] then return {'missing'} end
if f[1] ~= 'active' then return {'same', redis.call('HGETALL', KEYS[1])} end
local status, refund = 'completed', ARGV[2] == '0'
if tonumber(f[2]) <= tonumber(ARGV[3]) then status, refund = 'expired', false end
if refund then
  local units = tonumber(f[3])
  for _, name in ipairs(cjson.decode(f[4])) do
    local key = ARGV[5] .. name
    local v = tonumber(redis.call('GET', key))
    if v then
      v = v - units
      if v < 0 then v = 0 end
      redis.call('SET', key, v, 'KEEPTTL')
    end
  end
end
redis.call('HSET', KEYS[1], 'status', status, 'refunded', refund and '1' or '0',
  'finished_at', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'changed', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: 1 lease, 2 active. ARGV: 1 lease_id, 2 new expires_at, 3 now, 4 ttl ms.
_RENEW = """
local f = redis.call('HMGET', KEYS[1], 'status', 'expires_at')
if not f[1] then return {'missing'} end
if f[1] == 'active' and tonumber(f[2]) > tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'expires_at', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
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
  if redis.call('HGET', lk, 'status') == 'active' then
    redis.call('HSET', lk, 'status', 'expired', 'finished_at', ARGV[1])
    redis.call('ZADD', KEYS[2], ARGV[1], id)
    redis.call('PEXPIRE', lk, ARGV[4])
    out[#out + 1] = redis.call('HGETALL', lk)
  end
end
return out
"""

# KEYS: 1 window ends. ARGV: 1 now, 2 offset, 3 count, 4 window key prefix.
_LIVE = """
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
"""

# KEYS: 1 the window, 2 window ends. ARGV: 1 name, 2 used, 3 ends_at, 4 ttl ms.
_SET_COUNTER = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
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

# KEYS: 1 window ends, 2 done. ARGV: 1 now, 2 cutoff, 3 batch, 4 window key prefix,
#       5 lease key prefix. Deletes ended windows and leases finished before the cutoff;
#       returns how many of each and, flat, (idempotency key, lease id) of those deleted.
_PRUNE = """
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
"""

# KEYS: 1 an idempotency key. ARGV: 1 a pruned lease's id. Deletes the record (or the claim)
#       if it still names that lease, so the request_id is free again.
_FORGET = """
local v = redis.call('GET', KEYS[1])
if v and (v == ARGV[1] or string.sub(v, 1, #ARGV[1] + 1) == ARGV[1] .. ' ') then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS: 1 the day's row index. Deletes the day's rows and the index; returns how many rows.
_DROP_DAY = """
local rows = redis.call('SMEMBERS', KEYS[1])
for _, row in ipairs(rows) do redis.call('DEL', KEYS[1] .. ':' .. row) end
redis.call('DEL', KEYS[1])
return #rows
"""

# KEYS: 1 the day's row index. Returns row, fields for every row of that day.
_DAY_ROWS = """
local out = {}
for _, row in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = {row, redis.call('HGETALL', KEYS[1] .. ':' .. row)}
end
return out
"""

# KEYS: 1 the day's row index. ARGV: 1 row, 2 failed (1/0), 3 prompt tokens, 4 completion
#       tokens, 5 cost, 6 latency ms, 7 latency bucket field. All of it or none.
_RECORD_USAGE = """
local key = KEYS[1] .. ':' .. ARGV[1]
redis.call('HINCRBY', key, 'requests', 1)
redis.call('HINCRBY', key, 'failures', ARGV[2])
redis.call('HINCRBY', key, 'prompt_tokens', ARGV[3])
redis.call('HINCRBY', key, 'completion_tokens', ARGV[4])
redis.call('HINCRBYFLOAT', key, 'cost', ARGV[5])
redis.call('HINCRBY', key, 'latency_ms_sum', ARGV[6])
redis.call('HINCRBY', key, ARGV[7], 1)
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""


@contextlib.contextmanager
def _translate_errors() -> Iterator[None]:
    """The one place redis-py's errors become BackendUnavailable (the message holds no URL)."""
    try:
        yield
    except (RedisError, RedisClusterException, OSError) as exc:
        raise BackendUnavailable(f"redis store: {type(exc).__name__}: {exc}", backend="store") from None


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
    """StateStore on Redis or Redis Cluster (redis-py asyncio). The module docstring has
    the layout and the cluster protocol.

    Args:
        url: ``redis://`` or ``rediss://`` (TLS) URL; a password may be in it. With
            ``cluster`` it names any one node of the cluster.
        timeout: socket and connect timeout in seconds, and the longest a call queues for
            a free connection; past either it fails as BackendUnavailable.
        prefix: namespace of every key this store writes.
        retention: seconds ended leases and their idempotency records are kept
            (Redis drops them by itself after at least a day; ``prune`` sooner).
        window_margin: seconds a window's count outlives the window's end in Redis.
        max_connections: connections this process opens to Redis (per node on a
            cluster) at most; more calls in flight queue, first come first served.
        cluster: speak the Redis Cluster protocol.
    """

    def __init__(self, url: str, *, timeout: float = 0.5, prefix: str = "kb",
                 retention: float = 2 * _DAY, window_margin: float = 3600.0,
                 max_connections: int = 64, cluster: bool = False) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError("redis prefix must be non-empty and hold no { or }")
        if timeout <= 0:
            raise ValueError("redis timeout must be > 0")
        self._p = prefix
        self._cluster = cluster
        self._keep_ms = int(max(retention, _DAY) * 1000)  # TTL safety net, at least 24h
        self._margin = window_margin
        self._timeout = timeout
        self._accounts: set[str] = set()  # tags this process knows are in P:accounts
        self._days: set[str] = set()  # usage days this process knows are in P:usage:days
        # No retries: a failed call fails within the timeout and fails closed. The pool
        # checks a connection before use and reconnects, which covers a Redis restart.
        common: dict[str, Any] = dict(
            max_connections=max_connections, decode_responses=True, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), client_name="keybroker")
        self._redis: aioredis.Redis | RedisCluster
        if cluster:
            self._redis = RedisCluster.from_url(url, **common)
        else:
            self._redis = aioredis.Redis.from_pool(aioredis.ConnectionPool.from_url(url, **common))
        # Redis runs one script at a time, so more connections add no throughput. Calls
        # beyond the pool queue here in FIFO order (the pool itself would refuse them, and
        # its own waiting is not first-come first-served) for at most `timeout`.
        self._slots = asyncio.Semaphore(max_connections)
        self._ready = not cluster
        self._maintenance = asyncio.Semaphore(max(1, max_connections // 4))
        # How long a request_id claim stays its holder's without a new write from it: each
        # of the holder's calls may queue for a connection and then wait on the socket.
        self._claim_budget_ms = int(self._timeout * 6 * 1000)
        self._init_lock = asyncio.Lock()
        register = self._redis.register_script
        self._reserve, self._claim, self._complete, self._renew = (
            register(_RESERVE), register(_CLAIM), register(_COMPLETE), register(_RENEW))
        self._expire_due, self._live, self._set_counter, self._active = (
            register(_EXPIRE_DUE), register(_LIVE), register(_SET_COUNTER), register(_ACTIVE))
        self._prune, self._drop_day, self._day_rows, self._record_usage = (
            register(_PRUNE), register(_DROP_DAY), register(_DAY_ROWS), register(_RECORD_USAGE))
        self._forget = register(_FORGET)

    # -- key names ---------------------------------------------------------------------------

    def _k(self, suffix: str) -> str:
        return f"{self._p}:{suffix}"

    def _a(self, tag: str, suffix: str) -> str:
        """A key of the account whose slot tag is ``tag``."""
        return f"{self._p}:{{{tag}}}:{suffix}"

    def _idem_key(self, principal: str, request_id: str) -> str:
        return f"{self._p}:idem:{len(principal)}:{principal}:{request_id}"

    def _day_index(self, day: str) -> str:
        return self._k(f"usage:{{d:{day}}}")

    @staticmethod
    def _ttl_ms(ends_at: float, now: float, margin: float) -> int:
        return max(int((ends_at - now + margin) * 1000), 1000)

    @contextlib.asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """A connection slot (waiting at most the timeout) and the error translation."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise BackendUnavailable("redis store: no free connection within the timeout "
                                     "(more calls in flight than the pool serves)",
                                     backend="store") from None
        try:
            with _translate_errors():
                if not self._ready:
                    await self._initialize()
                yield
        finally:
            self._slots.release()

    async def _initialize(self) -> None:
        """Read the cluster's slot map once before the first command: redis-py's cluster
        client left to do it on demand, under concurrent first calls, closes connections
        other calls are reading from."""
        if isinstance(self._redis, RedisCluster):
            async with self._init_lock:
                if not self._ready:
                    await self._redis.initialize()
        self._ready = True

    async def _known(self, accounts: Mapping[str, str]) -> None:
        """Record accounts (tag -> name) in the directory before anything is written in them."""
        new = {t: a for t, a in accounts.items() if t not in self._accounts}
        if new:
            async with self._call():
                await self._redis.hset(self._k("accounts"), items=[x for kv in new.items() for x in kv])
            self._accounts.update(new)

    async def _tags(self) -> list[str]:
        async with self._call():
            return [str(t) for t in await self._redis.hkeys(self._k("accounts"))]

    async def _scripts(self, script: Any, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run ``script`` once per (KEYS, ARGV), results in order: on a single node in
        pipelines of up to 1,000 (a SCRIPT EXISTS and the pipeline: two round trips, a
        fraction of the CPU of one call each); on a cluster one call per slot, at most a
        quarter of the pool at a time, so maintenance never takes the lease RPCs' slots."""
        if self._cluster:
            async def one(keys: list[str], args: list[Any]) -> Any:
                async with self._maintenance, self._call():
                    return await script(keys=keys, args=args)

            return list(await asyncio.gather(*(one(k, a) for k, a in calls)))
        out: list[Any] = []
        for i in range(0, len(calls), _BATCH):
            async with self._call(), self._redis.pipeline(transaction=False) as pipe:
                for keys, args in calls[i:i + _BATCH]:
                    await script(keys=keys, args=args, client=pipe)  # queued
                out += await pipe.execute()
        return out

    async def _script_per_account(
            self, script: Any, call: Callable[[str], tuple[list[str], list[Any]]],
            tags: Sequence[str] | None = None) -> dict[str, Any]:
        """``script`` once per account in the directory (or in ``tags``); ``call(tag)`` gives
        its KEYS and ARGV. Returns each account's result by tag."""
        if tags is None:
            tags = await self._tags()
        return dict(zip(tags, await self._scripts(script, [call(t) for t in tags]), strict=True))

    # -- reservations ------------------------------------------------------------------------

    def _script_args(self, request: ReserveRequest, candidates: Sequence[Candidate],
                     idem: str, in_script: bool) -> tuple[list[str], list[str | int], list[str]]:
        """KEYS, ARGV and each candidate's lease id for one reserve script."""
        now = request.created_at
        lease_ttl = self._ttl_ms(request.expires_at, now, self._keep_ms / 1000)
        keys: list[str] = [idem] if in_script else []
        args: list[str | int] = [
            "1" if in_script else "0", request.principal, request.request_id, request.pool,
            request.model, request.units, repr(request.created_at), repr(request.expires_at),
            lease_ttl, self._p, len(candidates), idem if request.request_id else ""]
        ids = []
        for cand in candidates:
            tag = account_tag(cand.account)
            lease_id = lease_id_in(request.lease_id, cand.account)
            ids.append(lease_id)
            keys += [self._a(tag, f"lease:{lease_id}"), self._a(tag, "active"),
                     self._a(tag, "ends")]
            args += [lease_id, cand.key_id, cand.account,
                     json.dumps([w.name for w in cand.windows]), len(cand.windows)]
            for w in cand.windows:
                keys.append(self._a(tag, f"w:{w.name}"))
                args += [w.name, w.limit, repr(w.ends_at), self._ttl_ms(w.ends_at, now, self._margin)]
        return keys, args, ids

    def _answer(self, request: ReserveRequest, candidates: Sequence[Candidate],
                ids: Sequence[str], result: Sequence[Any]) -> Reservation | Rejection:
        if result[0] == "replay":
            return Reservation(lease=_lease(result[1]), used={}, replay=True)
        if result[0] == "reject":
            return Rejection(used={n: int(u) for n, u in _pairs(result[1]).items()})
        i = int(result[1]) - 1
        cand = candidates[i]
        lease = LeaseRecord(
            lease_id=ids[i], principal=request.principal, request_id=request.request_id,
            pool=request.pool, key_id=cand.key_id, account=cand.account, model=request.model,
            units=request.units, created_at=request.created_at, expires_at=request.expires_at,
            status=LeaseStatus.ACTIVE, refunded=False, windows=tuple(w.name for w in cand.windows))
        return Reservation(lease=lease, used={n: int(u) for n, u in _pairs(result[2]).items()})

    async def _run_reserve(self, request: ReserveRequest, candidates: Sequence[Candidate],
                           idem: str, in_script: bool) -> Reservation | Rejection:
        await self._known({account_tag(c.account): c.account for c in candidates})
        keys, args, ids = self._script_args(request, candidates, idem, in_script)
        async with self._call():
            result = await self._reserve(keys=keys, args=args)
        return self._answer(request, candidates, ids, result)

    async def reserve(self, request: ReserveRequest) -> Reservation | Rejection:
        idem = self._idem_key(request.principal, request.request_id)
        if not self._cluster:
            return await self._run_reserve(request, request.candidates, idem,
                                           in_script=bool(request.request_id))
        groups: dict[str, list[Candidate]] = {}
        for cand in request.candidates:
            groups.setdefault(account_tag(cand.account), []).append(cand)
        held = ""
        if request.request_id:
            first = next(iter(groups.values()), [])
            replay, held = await self._claim_request(
                request, idem, lease_id_in(request.lease_id, first[0].account) if first else "")
            if replay is not None:
                return replay
        seen: dict[str, int] = {}
        for i, group in enumerate(groups.values()):
            if held and i:  # point the claim at the lease this group would grant
                held = await self._move_claim(request, idem, held,
                                              lease_id_in(request.lease_id, group[0].account))
            result = await self._run_reserve(request, group, idem, in_script=False)
            if isinstance(result, Reservation):
                return result
            seen.update(result.used)
        if held:
            await self._move_claim(request, idem, held, "")  # nothing granted: free the id
        return Rejection(used=seen)

    async def _claim_op(self, request: ReserveRequest, idem: str, lease_id: str,
                        held: str) -> tuple[str, str, bool]:
        """One _CLAIM call: (the value this call now holds or '', someone else's value found
        or '', whether that one's deadline has passed)."""
        ttl = self._ttl_ms(request.expires_at, request.created_at, self._keep_ms / 1000)
        async with self._call():
            r = await self._claim(keys=[idem], args=[lease_id, ttl, held, self._claim_budget_ms])
        if not r:
            return "", "", False
        if len(r) == 1:
            return str(r[0]), "", False
        return "", str(r[0]), int(r[1]) == 1

    async def _move_claim(self, request: ReserveRequest, idem: str, held: str,
                          lease_id: str) -> str:
        mine, found, _ = await self._claim_op(request, idem, lease_id, held)
        if found:
            raise BackendUnavailable("redis store: the request_id's claim was taken over "
                                     "(this call ran past its deadline)", backend="store")
        return mine

    async def _claim_request(self, request: ReserveRequest, idem: str,
                             lease_id: str) -> tuple[Reservation | Rejection | None, str]:
        """Claim a request_id on a cluster for ``lease_id`` ('' = only look for a replay).

        Returns ``(None, value held)`` when this call may go on (holding the claim, or
        with nothing to claim), else the replay of the granted lease, or a Rejection for a
        replay-only call that found no lease. While another call holds the claim and its
        deadline (by Redis's clock) has not passed, it waits, for at most the timeout."""
        give_up = time.monotonic() + self._timeout
        held = ""
        while True:
            mine, found, stale = await self._claim_op(request, idem, lease_id, held)
            if not found:
                return None, mine
            lease = await self.get_lease(found.partition(" ")[0])
            if lease is not None:
                return Reservation(lease=lease, used={}, replay=True), ""
            if not stale:  # its holder is at work: wait for its grant or its release
                if time.monotonic() > give_up:
                    raise BackendUnavailable(
                        "redis store: the same request_id is being reserved by another call",
                        backend="store")
                await asyncio.sleep(0.01)
                held = ""
                continue
            if not lease_id:
                return Rejection(used={}), ""  # a replay-only call: no lease to replay
            held = found  # its holder died (or its lease was pruned): take the claim over

    # -- leases ------------------------------------------------------------------------------

    def _lease_key(self, lease_id: str) -> str:
        return self._a(lease_id[-TAG_HEX:], f"lease:{lease_id}")

    async def get_lease(self, lease_id: str) -> LeaseRecord | None:
        async with self._call():
            fields = await self._redis.hgetall(self._lease_key(lease_id))
        if not fields:
            return None
        return _lease([x for kv in fields.items() for x in kv])

    async def renew(self, lease_id: str, expires_at: float, now: float) -> LeaseRecord:
        ttl = self._ttl_ms(expires_at, now, self._keep_ms / 1000)
        tag = lease_id[-TAG_HEX:]
        async with self._call():
            result = await self._renew(keys=[self._lease_key(lease_id), self._a(tag, "active")],
                                       args=[lease_id, repr(expires_at), repr(now), ttl])
        if result[0] == "missing":
            raise LeaseNotFound(f"lease {lease_id} not found")
        if result[0] == "inactive":
            raise LeaseNotActive(f"lease {lease_id} is no longer active")
        ik = _pairs(result[1]).get("ik")
        if ik:  # its idempotency record lives as long as the lease (another slot: own call)
            async with self._call():
                await self._redis.pexpire(ik, ttl)
        return _lease(result[1])

    async def complete(self, lease_id: str, used: bool, now: float) -> tuple[LeaseRecord, bool]:
        tag = lease_id[-TAG_HEX:]
        async with self._call():
            result = await self._complete(
                keys=[self._lease_key(lease_id), self._a(tag, "active"), self._a(tag, "done")],
                args=[lease_id, int(used), repr(now), self._keep_ms, self._a(tag, "w:")])
        if result[0] == "missing":
            raise LeaseNotFound(f"lease {lease_id} not found")
        return _lease(result[1]), result[0] == "changed"

    async def expire_due(self, now: float, limit: int = 500) -> list[LeaseRecord]:
        found = await self._script_per_account(self._expire_due, lambda tag: (
            [self._a(tag, "active"), self._a(tag, "done")],
            [repr(now), limit, self._a(tag, "lease:"), self._keep_ms]))
        return [_lease(r) for rows in found.values() for r in rows]  # <= `limit` per account

    async def active_leases(self, now: float) -> Mapping[str, int]:
        out: dict[str, int] = {}
        for flat in (await self._script_per_account(self._active, lambda tag: (
                [self._a(tag, "active")], [repr(now), self._a(tag, "lease:")]))).values():
            for kid, n in _pairs(flat).items():
                out[kid] = out.get(kid, 0) + int(n)
        return out

    # -- counters ----------------------------------------------------------------------------

    async def counters(self, windows: Sequence[tuple[str, str]]) -> dict[str, int]:
        out = {name: 0 for _, name in windows}
        keys = {name: self._a(account_tag(account), f"w:{name}") for account, name in windows}
        groups: list[list[str]] = []  # names read by one MGET: one slot on a cluster
        if self._cluster:
            by_tag: dict[str, list[str]] = {}
            for account, name in windows:
                by_tag.setdefault(account_tag(account), []).append(name)
            groups = list(by_tag.values())
        else:
            groups = [list(keys)]

        async def one(names: list[str]) -> None:
            async with self._maintenance, self._call():
                counts = await self._redis.mget([keys[n] for n in names])
            out.update((n, int(c)) for n, c in zip(names, counts, strict=True) if c is not None)

        await asyncio.gather(*(one(g[i:i + _BATCH]) for g in groups
                               for i in range(0, len(g), _BATCH)))
        return out

    def _live_args(self, tag: str, now: float, offset: int) -> tuple[list[str], list[Any]]:
        return [self._a(tag, "ends")], [repr(now), offset, _BATCH, self._a(tag, "w:")]

    async def live_counters(self, now: float) -> dict[str, int]:
        out: dict[str, int] = {}
        offset, tags = 0, None
        while tags is None or tags:
            page = functools.partial(self._live_args, now=now, offset=offset)
            found = await self._script_per_account(self._live, page, tags)
            for _, flat in found.values():
                out.update((n, int(u)) for n, u in _pairs(flat).items())
            tags = [t for t, (scanned, _) in found.items() if int(scanned) >= _BATCH]
            offset += _BATCH
        return out

    async def set_counter(self, account: str, name: str, used: int, expires_at: float,
                          now: float) -> None:
        tag = account_tag(account)
        await self._known({tag: account})
        async with self._call():
            await self._set_counter(
                keys=[self._a(tag, f"w:{name}"), self._a(tag, "ends")],
                args=[name, used, repr(expires_at), self._ttl_ms(expires_at, now, self._margin)])

    # -- health, statistics, usage -----------------------------------------------------------

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
        day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
        if day not in self._days:  # the day is listed before any row of it is written
            async with self._call():
                await self._redis.zadd(self._k("usage:days"), {day: 0})
            self._days.add(day)
        row = json.dumps([lease.key_id, lease.account, report.model or lease.model,
                          lease.principal], separators=(",", ":"))
        failed = int(not 200 <= report.http_status < 300)
        async with self._call():
            await self._record_usage(
                keys=[self._day_index(day)],
                args=[row, failed, report.prompt_tokens, report.completion_tokens,
                      repr(float(report.cost)), report.latency_ms,
                      f"b{latency_bucket(report.latency_ms)}"])

    async def usage(self, since_day: str, until_day: str) -> list[UsageRow]:
        async with self._call():
            days = await self._redis.zrangebylex(self._k("usage:days"), f"[{since_day}",
                                                 f"[{until_day}")

        async def one(day: str) -> list[UsageRow]:
            async with self._call():
                found = await self._day_rows(keys=[self._day_index(day)])
            rows = []
            for row, flat in found:
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
            return rows

        rows = [r for day_rows in await asyncio.gather(*(one(str(d)) for d in days))
                for r in day_rows]
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

    # -- maintenance -------------------------------------------------------------------------

    async def prune(self, now: float, retention_seconds: float,
                    usage_retention_seconds: float = 30 * _DAY) -> int:
        total, tags = 0, None
        while tags is None or tags:  # each pass deletes up to _BATCH of each per account
            found = await self._script_per_account(self._prune, lambda tag: (
                [self._a(tag, "ends"), self._a(tag, "done")],
                [repr(now), repr(now - retention_seconds), _BATCH, self._a(tag, "w:"),
                 self._a(tag, "lease:")]), tags)
            forget: list[tuple[list[str], list[Any]]] = []
            for windows, leases, flat in found.values():
                total += int(windows) + int(leases)
                forget += [([str(flat[i])], [str(flat[i + 1])]) for i in range(0, len(flat), 2)]
            await self._scripts(self._forget, forget)  # their request_ids are free again
            tags = [t for t, (windows, leases, _) in found.items()
                    if int(windows) >= _BATCH or int(leases) >= _BATCH]
        oldest = datetime.fromtimestamp(now - usage_retention_seconds, UTC).strftime("%Y-%m-%d")
        async with self._call():
            days = await self._redis.zrangebylex(self._k("usage:days"), "-", f"({oldest}")
        for day in days:
            async with self._call():
                total += int(await self._drop_day(keys=[self._day_index(str(day))]))
                await self._redis.zrem(self._k("usage:days"), day)
            self._days.discard(str(day))
        return total

    async def close(self) -> None:
        """Close the pool; bounded, since a connection left mid-command by a cancelled call
        can make redis-py's disconnect wait forever, and shutdown must not hang."""
        with contextlib.suppress(RedisError, RedisClusterException, OSError, TimeoutError):
            async with asyncio.timeout(max(self._timeout, 0.1) * 4):
                await self._redis.aclose()
