"""Redis state store: any number of broker replicas share one Redis or one Redis Cluster.

Every reservation is ONE Lua script call (EVALSHA through redis-py's
``register_script``, which re-loads the script after a Redis restart answers
NOSCRIPT): the check of every window of each candidate in order, the charge of
the first candidate that fits, the lease record and its place in the
active-lease index happen atomically in one round trip (on a single Redis the
idempotency check and record are in the same script). Python never reads a
count and writes it back, so replicas cannot over-grant whatever their cached
counts say.

The key layout, with a table of every key, is in ``layout``; the scripts, each with its
KEYS and ARGV documented, are in ``scripts/``.

Slots. Everything one reservation touches in an account shares the account's hash tag
``{T}``, and every per-key window is named with its key's account (see
``engine.key_window``), so a reservation over one account's keys is one script on
one slot. A lease id ends in its account's tag (the store puts it in the last 12
hex digits of the ``ls_`` id the engine proposes), so RenewLease and Complete find
the lease's slot from the id alone. The tag is a hash, not the name, so any
account name (braces included) gives a valid tag of fixed length.

Single Redis (a primary with replicas or Sentinel included): one script gets all
candidates, of every account, and the idempotency record: exactly one round trip. A
retry whose request_id was granted reads the recorded lease in a second round trip
(the script only learns its id from the record, so it may not read the lease itself).

Redis Cluster (``cluster=True``): candidates are grouped by account and each group
is one script on its slot, tried in order; the first group nearly always grants,
so a LeaseKey is one round trip. The request_id is claimed first on its own key
(``claims``: one more round trip).

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
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from ...clock import day_window
from ...errors import BackendUnavailable, LeaseNotFound
from ...models import (
    LATENCY_BUCKETS_MS,
    Health,
    KeyStats,
    LeaseRecord,
    LeaseStatus,
    UsageRow,
    latency_bucket,
)
from ..base import (
    SHARED_WINDOW,
    TAG_HEX,
    Candidate,
    Rejection,
    ReportState,
    ReportWrite,
    Reservation,
    ReserveRequest,
    account_tag,
    gate_blocks,
    health_from_json,
    health_json,
    lease_id_in,
    not_renewable,
    stats_from_json,
    stats_json,
)
from . import scripts
from .claims import Claims
from .layout import Layout, ttl_ms

__all__ = ["RedisStore"]

_DAY = 86400.0
_BATCH = 1000  # names or leases one maintenance script handles per call
_REPLAY_TRIES = 8  # a request_id's record found naming a vanished lease, re-read at most


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
        key_version=int(f.get("key_version") or 0),
        finished_at=float(f.get("finished_at") or 0.0),
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
        self._keys = Layout(prefix)
        self._cluster = cluster
        self._keep_ms = int(max(retention, _DAY) * 1000)  # TTL safety net, at least 24h
        self._margin = window_margin
        self._timeout = timeout
        self._accounts: set[str] = set()  # tags this process knows are in P:accounts
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
        self._init_lock = asyncio.Lock()
        script = {name: self._redis.register_script(scripts.source(name)) for name in scripts.NAMES}
        self._reserve, self._complete, self._renew = script["reserve"], script["complete"], script["renew"]
        self._expire_due, self._live, self._set_counter, self._active = (
            script["expire_due"], script["live"], script["set_counter"], script["active"])
        self._prune, self._drop_day, self._day_rows = (
            script["prune"], script["drop_day"], script["day_rows"])
        self._report, self._report_state = script["report"], script["report_state"]
        self._forget, self._end_leases = script["forget"], script["end_leases"]
        self._claims = Claims(script["claim"], self._call, self.get_lease, timeout=timeout,
                              keep_ms=self._keep_ms)

    @contextlib.asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """A connection slot (waiting at most the timeout) and the error translation."""
        try:
            if self._slots.locked():  # wait for a slot, at most the timeout
                async with asyncio.timeout(self._timeout):
                    await self._slots.acquire()
            else:  # a slot is free: taken at once, no timer to arm and cancel
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
                await self._redis.hset(self._keys.accounts(), items=[x for kv in new.items() for x in kv])
            self._accounts.update(new)

    async def _tags(self) -> list[str]:
        async with self._call():
            return [str(t) for t in await self._redis.hkeys(self._keys.accounts())]

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
                     idem: str, in_script: bool, stale: str,
                     budget: Sequence[tuple[str, str, int]] = (),
                     outside: int = 0) -> tuple[list[str], list[str | int], list[str]]:
        """KEYS, ARGV and each candidate's lease id for one reserve.lua call; ``budget`` the
        budget windows in this call's slots, ``outside`` the budget's units counted elsewhere."""
        now = request.created_at
        lease_ttl = ttl_ms(request.expires_at, now, self._keep_ms / 1000)
        keys: list[str] = [idem] if in_script else []
        allowed = "" if request.budget is None else repr(float(request.budget.allowed))
        args: list[str | int] = [
            "1" if in_script else "0", request.principal, request.request_id, request.pool,
            request.model, request.units, repr(request.created_at), repr(request.expires_at),
            lease_ttl, stale, len(candidates), idem if request.request_id else "",
            repr(request.probe_until), allowed, len(budget) if allowed else 0, outside]
        if allowed:
            args += [cap for _, _, cap in budget]
        ids = []
        for cand in candidates:
            tag = account_tag(cand.account)
            lease_id = lease_id_in(request.lease_id, cand.account)
            ids.append(lease_id)
            keys += [self._keys.lease(lease_id), self._keys.active(tag),
                     self._keys.ends(tag), self._keys.health(tag)]
            args += [lease_id, cand.key_id, cand.account,
                     json.dumps([w.name for w in cand.windows]), cand.key_subject,
                     cand.account_subject, cand.key_version, cand.paid_subject,
                     len(cand.windows)]
            for w in cand.windows:
                keys.append(self._keys.window(tag, w.name))
                args += [w.name, w.limit, repr(w.ends_at), ttl_ms(w.ends_at, now, self._margin)]
        if allowed:
            keys += [self._keys.window(account_tag(account), name) for account, name, _ in budget]
        return keys, args, ids

    def _answer(self, request: ReserveRequest, candidates: Sequence[Candidate],
                ids: Sequence[str], result: Sequence[Any]) -> Reservation | Rejection | str:
        if result[0] == "claimed":
            return str(result[1])
        if result[0] == "budget":
            return Rejection(used={}, budget_spent=int(result[1]))
        if result[0] == "reject":
            return Rejection(used={n: int(u) for n, u in _pairs(result[1]).items()},
                             health={s: health_from_json(h) for s, h in _pairs(result[2]).items()})
        i = int(result[1]) - 1
        cand = candidates[i]
        lease = LeaseRecord(
            lease_id=ids[i], principal=request.principal, request_id=request.request_id,
            pool=request.pool, key_id=cand.key_id, account=cand.account, model=request.model,
            units=request.units, created_at=request.created_at, expires_at=request.expires_at,
            status=LeaseStatus.ACTIVE, refunded=False, windows=tuple(w.name for w in cand.windows),
            key_version=cand.key_version)
        return Reservation(lease=lease, used={n: int(u) for n, u in _pairs(result[2]).items()})

    async def _run_reserve(self, request: ReserveRequest, candidates: Sequence[Candidate],
                           idem: str, in_script: bool, stale: str = "",
                           budget: Sequence[tuple[str, str, int]] = (),
                           outside: int = 0) -> Reservation | Rejection | str:
        """One reserve.lua call; a str is the idempotency record it found (``in_script``)."""
        await self._known({account_tag(c.account): c.account for c in candidates})
        keys, args, ids = self._script_args(request, candidates, idem, in_script, stale, budget,
                                            outside)
        async with self._call():
            result = await self._reserve(keys=keys, args=args)
        return self._answer(request, candidates, ids, result)

    async def _reserve_single(self, request: ReserveRequest, idem: str) -> Reservation | Rejection:
        """On a single Redis: one script with the idempotency record; a record found names a
        lease to replay, read here (a script may only touch the keys it is given), or, when
        that lease is gone, a stale record the next call may overwrite."""
        stale = ""
        for _ in range(_REPLAY_TRIES):
            budget = request.budget.windows if request.budget is not None else ()
            result = await self._run_reserve(request, request.candidates, idem,
                                             in_script=bool(request.request_id), stale=stale,
                                             budget=budget)
            if not isinstance(result, str):
                return result
            lease = await self.get_lease(result.partition(" ")[0])
            if lease is not None:
                return Reservation(lease=lease, used={}, replay=True)
            stale = result
        raise BackendUnavailable("redis store: the request_id's record kept changing",
                                 backend="store")

    async def _gated(self, request: ReserveRequest) -> Rejection | None:
        """The pool-wide records (a model's cooldown) live in their own slot: read just
        before the reservation (read-then-reserve; a cooldown written between the two lets
        this one lease through)."""
        if not request.gates:
            return None
        async with self._call():
            raws = await asyncio.gather(*(self._redis.hget(self._keys.health(account_tag(scope)),
                                                           subject)
                                          for scope, subject in request.gates))
        for (_, subject), raw in zip(request.gates, raws, strict=True):
            if raw:
                gate = health_from_json(raw if isinstance(raw, str) else raw.decode())
                if gate_blocks(gate, request.created_at):
                    return Rejection(used={}, health={subject: gate})
        return None

    async def reserve(self, request: ReserveRequest) -> Reservation | Rejection:
        idem = self._keys.idem(request.principal, request.request_id)
        if request.candidates:
            gated = await self._gated(request)
            if gated is not None:
                return gated
        if not self._cluster:
            return await self._reserve_single(request, idem)
        groups: dict[str, list[Candidate]] = {}
        for cand in request.candidates:
            groups.setdefault(account_tag(cand.account), []).append(cand)
        held = ""
        if request.request_id:
            first = next(iter(groups.values()), [])
            replay, held = await self._claims.claim(
                request, idem, lease_id_in(request.lease_id, first[0].account) if first else "")
            if replay is not None:
                return replay
        seen: dict[str, int] = {}
        health: dict[str, Any] = {}
        for i, (tag, group) in enumerate(groups.items()):
            if held and i:  # point the claim at the lease this group would grant
                held = await self._claims.move(request, idem, held,
                                               lease_id_in(request.lease_id, group[0].account))
            inside, outside = await self._cluster_budget(request, tag)
            result = await self._run_reserve(request, group, idem, in_script=False,
                                             budget=inside, outside=outside)
            if isinstance(result, Reservation):
                return result
            if isinstance(result, Rejection):
                if result.budget_spent is not None:
                    if held:
                        await self._claims.move(request, idem, held, "")
                    return result
                seen.update(result.used)
                health.update(result.health)
        if held:
            await self._claims.move(request, idem, held, "")  # nothing granted: free the id
        return Rejection(used=seen, health=health)

    async def _cluster_budget(self, request: ReserveRequest,
                              tag: str) -> tuple[list[tuple[str, str, int]], int]:
        """On a cluster a script sees one slot: the budget windows in ``tag``'s slot, and the
        units counted in the others (read just before, so across slots the budget is as
        exact as two replicas' calls do not interleave between the read and the script)."""
        if request.budget is None:
            return [], 0
        inside = [w for w in request.budget.windows if account_tag(w[0]) == tag]
        others = [w for w in request.budget.windows if account_tag(w[0]) != tag]
        if not others:
            return inside, 0
        counts = await self.counters([(a, n) for a, n, _ in others])
        return inside, sum(min(counts[n], cap) for _, n, cap in others)

    # -- leases ------------------------------------------------------------------------------

    async def get_lease(self, lease_id: str) -> LeaseRecord | None:
        async with self._call():
            fields = await self._redis.hgetall(self._keys.lease(lease_id))
        if not fields:
            return None
        return _lease([x for kv in fields.items() for x in kv])

    async def renew(self, lease_id: str, expires_at: float, now: float) -> LeaseRecord:
        ttl = ttl_ms(expires_at, now, self._keep_ms / 1000)
        tag = lease_id[-TAG_HEX:]
        async with self._call():
            result = await self._renew(keys=[self._keys.lease(lease_id), self._keys.active(tag)],
                                       args=[lease_id, repr(expires_at), repr(now), ttl])
        if result[0] == "missing":
            raise LeaseNotFound(f"lease {lease_id} not found")
        if result[0] == "inactive":
            raise not_renewable(_lease(result[1]))
        ik = _pairs(result[1]).get("ik")
        if ik:  # its idempotency record lives as long as the lease (another slot: own call)
            async with self._call():
                await self._redis.pexpire(ik, ttl)
        return _lease(result[1])

    async def complete(self, lease_id: str, used: bool, now: float) -> tuple[LeaseRecord, bool]:
        tag = lease_id[-TAG_HEX:]
        async with self._call():
            result = await self._complete(
                keys=[self._keys.lease(lease_id), self._keys.active(tag), self._keys.done(tag)],
                args=[lease_id, int(used), repr(now), self._keep_ms, self._keys.window_prefix(tag),
                      self._keys.shared_window_prefix(), SHARED_WINDOW])
        if result[0] == "missing":
            raise LeaseNotFound(f"lease {lease_id} not found")
        return _lease(result[1]), result[0] == "changed"

    async def expire_due(self, now: float, limit: int = 500) -> list[LeaseRecord]:
        found = await self._script_per_account(self._expire_due, lambda tag: (
            [self._keys.active(tag), self._keys.done(tag)],
            [repr(now), limit, self._keys.lease_prefix(tag), self._keep_ms]))
        return [_lease(r) for rows in found.values() for r in rows]  # <= `limit` per account

    async def end_leases(self, account: str, key_id: str, now: float) -> list[LeaseRecord]:
        # One script over the account's active-lease index, on its slot: atomic, so no lease
        # of the key is missed (none can be granted meanwhile: its health record, in the
        # same slot, stops them). It walks the whole index, as active.lua does.
        tag = account_tag(account)
        async with self._call():
            found = await self._end_leases(
                keys=[self._keys.active(tag), self._keys.done(tag)],
                args=[key_id, repr(now), self._keys.lease_prefix(tag), self._keep_ms])
        return [_lease(r) for r in found]

    async def active_leases(self, now: float) -> Mapping[str, int]:
        out: dict[str, int] = {}
        for flat in (await self._script_per_account(self._active, lambda tag: (
                [self._keys.active(tag)], [repr(now), self._keys.lease_prefix(tag)]))).values():
            for kid, n in _pairs(flat).items():
                out[kid] = out.get(kid, 0) + int(n)
        return out

    # -- counters ----------------------------------------------------------------------------

    async def counters(self, windows: Sequence[tuple[str, str]]) -> dict[str, int]:
        out = {name: 0 for _, name in windows}
        keys = {name: self._keys.window(account_tag(account), name) for account, name in windows}
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
        return [self._keys.ends(tag)], [repr(now), offset, _BATCH, self._keys.window_prefix(tag)]

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
                keys=[self._keys.window(tag, name), self._keys.ends(tag)],
                args=[name, used, repr(expires_at), ttl_ms(expires_at, now, self._margin)])

    # -- health, statistics, usage -----------------------------------------------------------

    async def _per_tag(self, read: Callable[[str], Any]) -> dict[str, Any]:
        """``read(tag)`` (one command on the account's slot) for every account, by tag."""
        tags = await self._tags()

        async def one(tag: str) -> Any:
            async with self._maintenance, self._call():
                return await read(tag)

        return dict(zip(tags, await asyncio.gather(*(one(t) for t in tags)), strict=True))

    async def health(self) -> dict[str, Health]:
        found = await self._per_tag(lambda tag: self._redis.hgetall(self._keys.health(tag)))
        return {str(subject): health_from_json(raw)
                for rows in found.values() for subject, raw in rows.items()}

    async def put_health(self, account: str, subject: str, health: Health) -> None:
        tag = account_tag(account)
        await self._known({tag: account})
        async with self._call():
            if health == Health():
                await self._redis.hdel(self._keys.health(tag), subject)
            else:
                await self._redis.hset(self._keys.health(tag), subject, health_json(health))

    async def report_state(self, lease: LeaseRecord, key_subject: str,
                           account_subject: str, paid_subject: str = "") -> ReportState:
        tag = account_tag(lease.account)
        async with self._call():
            answer, own, acct, stats, paid = await self._report_state(
                keys=[self._keys.lease(lease.lease_id), self._keys.health(tag),
                      self._keys.stats(tag)],
                args=[key_subject, account_subject, lease.key_id, paid_subject])
        health = {s: health_from_json(raw) for s, raw in ((key_subject, own),
                                                          (account_subject, acct),
                                                          (paid_subject, paid)) if raw}
        return ReportState(answer=health_from_json(answer) if answer else None, health=health,
                           stats=stats_from_json(stats) if stats else None,
                           token={key_subject: own, account_subject: acct, "": stats,
                                  **({paid_subject: paid} if paid_subject else {})})

    async def apply_report(self, write: ReportWrite) -> tuple[Health, bool] | None:
        lease, report, now = write.lease, write.report, write.now
        tag = account_tag(lease.account)
        await self._known({tag: lease.account})
        read = write.token
        assert isinstance(read, dict)
        day = day_window(now)[0]  # memoised: no strftime per report
        row = json.dumps([lease.key_id, lease.account, report.model or lease.model,
                          lease.principal], separators=(",", ":"))
        keys = [self._keys.lease(lease.lease_id), self._keys.health(tag), self._keys.stats(tag),
                self._keys.ends(tag), self._keys.usage_days(tag), self._keys.usage_day(tag, day),
                self._keys.usage_row(tag, day, row)]
        counter: list[str | int] = ["", "", "", ""]
        if write.counter is not None:
            name, used, ends_at = write.counter
            keys.append(self._keys.window(tag, name))
            counter = [name, used, repr(ends_at), ttl_ms(ends_at, now, self._margin)]
        args: list[str | int] = [
            health_json(write.answer), lease.key_id, read.get("", ""),
            "" if write.stats is None else stats_json(write.stats), day, row,
            int(not 200 <= report.http_status < 300), report.prompt_tokens,
            report.completion_tokens, repr(float(report.cost)), report.latency_ms,
            f"b{latency_bucket(report.latency_ms)}", 0, len(write.health), "", *counter]
        for subject, health in write.health.items():
            args += [subject, read.get(subject, ""), "" if health == Health() else health_json(health)]
        async with self._call():
            result = await self._report(keys=keys, args=args)
        if result[0] == "missing":
            raise LeaseNotFound(f"lease {lease.lease_id} not found")
        if result[0] == "conflict":
            return None
        return health_from_json(result[1]), result[0] == "applied"

    async def usage(self, since_day: str, until_day: str) -> list[UsageRow]:
        days = await self._per_tag(lambda tag: self._redis.zrangebylex(
            self._keys.usage_days(tag), f"[{since_day}", f"[{until_day}"))

        async def one(tag: str, day: str) -> list[UsageRow]:
            async with self._maintenance, self._call():
                found = await self._day_rows(keys=[self._keys.usage_day(tag, day)],
                                             args=[self._keys.usage_row_prefix(tag, day)])
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

        rows = [r for day_rows in await asyncio.gather(
            *(one(tag, str(d)) for tag, ds in days.items() for d in ds)) for r in day_rows]
        rows.sort(key=lambda r: (r.day, r.key_id, r.account, r.model, r.principal))
        return rows

    async def key_stats(self) -> dict[str, KeyStats]:
        found = await self._per_tag(lambda tag: self._redis.hgetall(self._keys.stats(tag)))
        return {str(kid): stats_from_json(raw) for rows in found.values()
                for kid, raw in rows.items()}

    # -- maintenance -------------------------------------------------------------------------

    async def prune(self, now: float, retention_seconds: float,
                    usage_retention_seconds: float = 30 * _DAY) -> int:
        total, tags = 0, None
        while tags is None or tags:  # each pass deletes up to _BATCH of each per account
            found = await self._script_per_account(self._prune, lambda tag: (
                [self._keys.ends(tag), self._keys.done(tag)],
                [repr(now), repr(now - retention_seconds), _BATCH, self._keys.window_prefix(tag),
                 self._keys.lease_prefix(tag)]), tags)
            forget: list[tuple[list[str], list[Any]]] = []
            for windows, leases, flat in found.values():
                total += int(windows) + int(leases)
                forget += [([str(flat[i])], [str(flat[i + 1])]) for i in range(0, len(flat), 2)]
            await self._scripts(self._forget, forget)  # their request_ids are free again
            tags = [t for t, (windows, leases, _) in found.items()
                    if int(windows) >= _BATCH or int(leases) >= _BATCH]
        oldest = datetime.fromtimestamp(now - usage_retention_seconds, UTC).strftime("%Y-%m-%d")
        old = await self._per_tag(lambda tag: self._redis.zrangebylex(
            self._keys.usage_days(tag), "-", f"({oldest}"))
        for tag, days in old.items():
            for day in days:
                async with self._call():
                    total += int(await self._drop_day(
                        keys=[self._keys.usage_day(tag, str(day))],
                        args=[self._keys.usage_row_prefix(tag, str(day))]))
                    await self._redis.zrem(self._keys.usage_days(tag), day)
        return total

    async def close(self) -> None:
        """Close the pool; bounded, since a connection left mid-command by a cancelled call
        can make redis-py's disconnect wait forever, and shutdown must not hang."""
        with contextlib.suppress(RedisError, RedisClusterException, OSError, TimeoutError):
            async with asyncio.timeout(max(self._timeout, 0.1) * 4):
                await self._redis.aclose()
