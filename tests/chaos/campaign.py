"""The campaign: real OpenBao, redis-server (AOF ``always``) and ``keybroker serve`` replicas,
clients doing a seeded random mix of every lease RPC, and a nemesis doing seeded random faults.

    result = await run_campaign(Plan(backend="redis", seed=7, duration=60), workdir)
    print(result.report())

Every random choice comes from ``random.Random`` seeded from the plan's seed (one stream for
the nemesis, one per client), so a seed replays the same fault schedule and the same client
choices; the interleaving is the machine's, as in any real-process campaign.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from keybroker_client import AsyncKeyBrokerClient, BrokerError, QuotaExhausted

from broker.clock import day_window, minute_window, next_midnight
from broker.config import VaultSettings
from broker.engine.windows import account_day, account_minute, account_subject, key_subject
from broker.store.base import blocked
from broker.testing import BaoDevServer, BrokerProcess, PolicyBuilder, RedisServer, free_port
from broker.testing.process import clean_environ
from broker.vault import VaultAdmin, VaultSession

from .history import FAIL, OK, UNKNOWN, UNKNOWN_CODES, Fault, History, Op
from .proxy import TcpProxy

__all__ = ["ACCOUNTS", "POOLS", "Plan", "World", "run_campaign"]

# pool -> account -> key names. p0 has two accounts (one of two keys), p1 and p2 one each.
POOLS: dict[str, dict[str, tuple[str, ...]]] = {
    "p0": {"acct-0": ("k0a", "k0b"), "acct-1": ("k1",)},
    "p1": {"acct-2": ("k2",)},
    "p2": {"acct-3": ("k3",)},
}
ACCOUNTS = {acct: pool for pool, accts in POOLS.items() for acct in accts}
KEY_IDS = [f"{pool}/{name}" for pool, accts in POOLS.items() for names in accts.values()
           for name in names]
DAILY = 15
MINUTE = 5
CALL_TIMEOUT = 5.0
REDIS_KINDS = ("kill9", "clock", "redis_pause", "redis_restart", "vault_restart", "latency",
               "drop")
SQLITE_KINDS = ("kill9", "clock")


@dataclass
class Plan:
    backend: str = "redis"  # or "sqlite"
    seed: int = 1
    duration: float = 60.0  # seconds of client load
    clients: int = 32
    replicas: int = 3  # SQLite: always 1
    kinds: tuple[str, ...] = ()  # default: every kind the backend supports
    gap: tuple[float, float] = (0.2, 1.0)  # pause between faults

    def __post_init__(self) -> None:
        if self.backend == "sqlite":
            self.replicas = 1
        if not self.kinds:
            self.kinds = SQLITE_KINDS if self.backend == "sqlite" else REDIS_KINDS


@dataclass
class Replica:
    index: int
    port: int
    metrics_port: int
    offset: float
    proxy: TcpProxy | None = None
    proc: BrokerProcess | None = None
    incarnation: int = 0
    logs: list[Path] = field(default_factory=list)


class World:
    """Every process of one campaign and the clients talking to them."""

    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.dir = workdir
        self.history = History()
        self.rng = random.Random(f"nemesis-{plan.seed}")
        self.tokens = {who: f"kbt_chaos_{who}_{secrets.token_hex(12)}"
                       for who in ("alice", "bob", "admin")}
        self.secrets = {kid: f"sk-or-v1-chaos-{secrets.token_hex(24)}" for kid in KEY_IDS}
        self.prefix = f"chaos-{uuid.uuid4().hex[:8]}"
        self.redis_prefix = f"kbc{uuid.uuid4().hex[:6]}"
        self.bao: BaoDevServer | None = None
        self.bao_port = free_port()
        self.bao_token = "dev-" + secrets.token_hex(16)
        self.vault_proxy = TcpProxy(self.bao_port)
        self.bao_failures: list[str] = []  # OpenBao restarts that had to be tried again
        self.redis: RedisServer | None = None
        self.replicas: list[Replica] = []
        self.clients: dict[tuple[int, str], AsyncKeyBrokerClient] = {}
        self.stopping = False
        self.active_faults = 0
        self._truth: Any = None  # a direct store connection for reading the truth
        self._tasks: set[asyncio.Future[None]] = set()

    # ----- set-up -------------------------------------------------------------------------

    def base_offset(self, lead: float) -> float:
        """An offset putting broker clocks ``lead`` seconds before the next 00:00 UTC (or the
        one after, when the current broker time is already less than a minute before it)."""
        now = time.time()
        current = now + (self.replicas[0].offset if self.replicas else 0.0)
        target = next_midnight(current + 60.0) - lead
        return target - now

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        await self.vault_proxy.start()
        await asyncio.to_thread(self._start_bao)
        if self.plan.backend == "redis":
            self.redis = RedisServer(aof=True, directory=self.dir / "redis")
            await asyncio.to_thread(self.redis.start)
        policy = (PolicyBuilder()
                  .role("consumer", rpcs=["KeyBroker/*"], pools=list(POOLS),
                        priorities=["high", "normal", "low"])
                  .role("admin", rpcs=["*"], pools=["*"])
                  .principal("alice", self.tokens["alice"], roles=["consumer"])
                  .principal("bob", self.tokens["bob"], roles=["consumer"])
                  .principal("admin", self.tokens["admin"], roles=["admin"])
                  .to_toml())
        (self.dir / "policy.toml").write_text(policy)
        base = self.base_offset(lead=min(25.0, self.plan.duration / 3))
        for i in range(self.plan.replicas):
            skew = self.rng.uniform(-0.4, 0.4) if self.plan.replicas > 1 else 0.0
            r = Replica(i, free_port(), free_port(), base + skew)
            if self.redis is not None:
                r.proxy = await TcpProxy(self.redis.port).start()
            self.replicas.append(r)
        await asyncio.gather(*(self.boot(r) for r in self.replicas))
        for r in self.replicas:
            for who in ("alice", "bob", "admin"):
                self.clients[(r.index, who)] = AsyncKeyBrokerClient(
                    f"127.0.0.1:{r.port}", token=self.tokens[who])
        self._truth = self._open_truth()

    def _start_bao(self) -> None:
        bao = BaoDevServer(port=self.bao_port)
        bao.root_token = self.bao_token
        for attempt in range(3):
            # On a loaded shared machine a restarted dev server now and then dies before
            # it prints a line (status -15): the restart is the nemesis's, so try again.
            try:
                bao.start()
                break
            except RuntimeError as exc:
                self.bao_failures.append(str(exc)[:200])
                if attempt == 2:
                    raise
                bao.close()
                bao = BaoDevServer(port=self.bao_port)
                bao.root_token = self.bao_token
        admin = VaultAdmin(VaultSession(VaultSettings(addr=bao.addr, token=self.bao_token,
                                                      key_prefix=self.prefix)))
        admin.bootstrap()
        for pool, accts in POOLS.items():
            for acct, names in accts.items():
                for name in names:
                    admin.put_key(pool, name, self.secrets[f"{pool}/{name}"], account=acct)
        self.bao = bao

    def env(self, r: Replica) -> dict[str, str]:
        settings = {
            "KEYBROKER_POLICY_FILE": str(self.dir / "policy.toml"),
            "KEYBROKER_VAULT_ADDR": f"http://127.0.0.1:{self.vault_proxy.port}",
            "KEYBROKER_VAULT_TOKEN": self.bao_token,
            "KEYBROKER_VAULT_KEY_PREFIX": self.prefix,
            "KEYBROKER_VAULT_RELOAD_INTERVAL": "2",
            "KEYBROKER_VAULT_TIMEOUT": "2",
            "KEYBROKER_QUOTA_DAILY_LIMIT": str(DAILY),
            "KEYBROKER_QUOTA_MINUTE_LIMIT": str(MINUTE),
            "KEYBROKER_LEASE_SWEEP_INTERVAL": "0.5",
            # clock faults jump days ahead: keep every window the checker reads at the end
            "KEYBROKER_LEASE_RETENTION_DAYS": "1000",
            "KEYBROKER_LEASE_USAGE_RETENTION_DAYS": "1000",
            "KEYBROKER_LOG_LEVEL": "info",
            "KEYBROKER_AUDIT_FILE": str(self.dir / f"audit{r.index}.jsonl"),
            "KEYBROKER_METRICS_LISTEN": f"127.0.0.1:{r.metrics_port}",
            "KEYBROKER_CLOCK_OFFSET": repr(r.offset),
        }
        if self.plan.backend == "redis":
            assert r.proxy is not None
            settings |= {"KEYBROKER_STORE_BACKEND": "redis",
                         "KEYBROKER_STORE_REDIS_URL": f"redis://127.0.0.1:{r.proxy.port}/0",
                         "KEYBROKER_STORE_REDIS_PREFIX": self.redis_prefix,
                         "KEYBROKER_STORE_REDIS_TIMEOUT": "0.5"}
        else:
            settings |= {"KEYBROKER_STORE_BACKEND": "sqlite",
                         "KEYBROKER_STORE_SQLITE_PATH": str(self.dir / "state.db")}
        return {**clean_environ(), **settings}

    async def boot(self, r: Replica, timeout: float = 60.0) -> None:
        """Start replica ``r`` (a new incarnation, its own log file) and wait until SERVING."""
        if r.proc is not None:
            await asyncio.to_thread(r.proc.stop, 5.0)  # reaps it (killed) and closes its log
        r.incarnation += 1
        log = self.dir / f"broker{r.index}-{r.incarnation}.log"
        r.logs.append(log)
        self.history.offsets.setdefault(r.index, []).append((time.time(), r.offset))
        r.proc = BrokerProcess(self.env(r), name=f"broker{r.index}", port=r.port,
                               log_path=log).start()
        await r.proc.wait_serving(timeout)

    def _open_truth(self) -> Any:
        if self.plan.backend == "redis":
            from broker.store.redis import RedisStore

            assert self.redis is not None
            return RedisStore(self.redis.url, prefix=self.redis_prefix, timeout=1.0)
        return None  # SQLite: opened per read (see truth())

    async def truth(self, windows: list[tuple[str, str]]) -> tuple[dict[str, int], dict[str, Any]]:
        """The store's counts of ``windows`` and every health record, read directly."""
        if self.plan.backend == "redis":
            counts = await self._truth.counters(windows)
            return counts, await self._truth.health()
        from broker.store.sqlite import SQLiteStore

        store = SQLiteStore(self.dir / "state.db")
        store.open()
        try:
            return await store.counters(windows), await store.health()
        finally:
            await store.close()

    async def close(self) -> None:
        for c in self.clients.values():
            with contextlib.suppress(Exception):
                await c.close()
        if self._truth is not None:
            with contextlib.suppress(Exception):
                await self._truth.close()
        for r in self.replicas:
            if r.proc is not None:
                await asyncio.to_thread(r.proc.stop, 5.0)
            if r.proxy is not None:
                await r.proxy.close()
        if self.redis is not None:
            await asyncio.to_thread(self.redis.close)
        if self.bao is not None:
            await asyncio.to_thread(self.bao.close)
        await self.vault_proxy.close()

    # ----- the nemesis ----------------------------------------------------------------------

    async def nemesis(self, until: float) -> None:
        """Faults one after another until ``until``; each kind in turn, in a seeded order."""
        order: list[str] = []
        while time.time() < until:
            if not order:
                order = list(self.plan.kinds)
                self.rng.shuffle(order)
            kind = order.pop()
            await asyncio.sleep(self.rng.uniform(*self.plan.gap))
            if time.time() >= until:
                break
            fault = Fault(kind, "", time.time())
            self.history.faults.append(fault)
            self.active_faults += 1
            try:
                await getattr(self, f"_fault_{kind}")(fault)
            finally:
                fault.healed = time.time()
                self.active_faults -= 1

    async def _fault_kill9(self, fault: Fault) -> None:
        r = self.rng.choice(self.replicas)
        fault.target = f"broker{r.index}"
        assert r.proc is not None
        await asyncio.to_thread(r.proc.kill9)
        await asyncio.sleep(self.rng.uniform(0.1, 2.0))
        await self.boot(r)

    async def _fault_clock(self, fault: Fault) -> None:
        """Every replica restarted (kill -9, each within a second) with its clock shifted to
        just before the next 00:00 UTC and skewed from its peers by up to 0.4 s each way:
        crossing a day and a minute boundary while the replicas disagree."""
        lead = self.rng.uniform(8.0, 30.0)
        base = self.base_offset(lead)
        fault.target = "all"
        fault.detail = f"offset {base:+.1f}s (broker time {lead:.1f}s before 00:00 UTC)"
        async def shift(r: Replica, delay: float, skew: float) -> None:
            await asyncio.sleep(delay)
            assert r.proc is not None
            await asyncio.to_thread(r.proc.kill9)
            r.offset = base + skew
            await self.boot(r)

        await asyncio.gather(*(shift(r, self.rng.uniform(0.0, 1.0),
                                     self.rng.uniform(-0.4, 0.4) if len(self.replicas) > 1
                                     else 0.0) for r in self.replicas))

    async def _fault_redis_pause(self, fault: Fault) -> None:
        assert self.redis is not None
        hold = self.rng.uniform(0.1, 3.0)
        fault.target, fault.detail = "redis", f"{hold:.2f}s"
        self.redis.pause()
        try:
            await asyncio.sleep(hold)
        finally:
            self.redis.resume()

    async def _fault_redis_restart(self, fault: Fault) -> None:
        assert self.redis is not None
        hold = self.rng.uniform(0.1, 2.0)
        fault.target, fault.detail = "redis", f"kill -9, down {hold:.2f}s, restart from AOF"
        self.redis.kill9()
        await asyncio.sleep(hold)
        await asyncio.to_thread(self.redis.start)

    async def _fault_vault_restart(self, fault: Fault) -> None:
        """OpenBao stopped and started again. The dev server keeps nothing, so the restarted
        one is bootstrapped and given the same keys before its proxy lets brokers in: what a
        restart of a server with storage looks like to them."""
        hold = self.rng.uniform(0.5, 3.0)
        fault.target, fault.detail = "openbao", f"down {hold:.2f}s"
        self.vault_proxy.block = True
        self.vault_proxy.drop()
        assert self.bao is not None
        await asyncio.to_thread(self.bao.close)
        self.bao = None
        await asyncio.sleep(hold)
        await asyncio.to_thread(self._start_bao)
        self.vault_proxy.block = False

    async def _fault_latency(self, fault: Fault) -> None:
        r = self.rng.choice(self.replicas)
        assert r.proxy is not None
        delay, hold = self.rng.uniform(0.05, 0.6), self.rng.uniform(0.5, 3.0)
        fault.target, fault.detail = f"broker{r.index}<->redis", f"+{delay:.2f}s for {hold:.2f}s"
        r.proxy.latency = delay
        try:
            await asyncio.sleep(hold)
        finally:
            r.proxy.latency = 0.0

    async def _fault_drop(self, fault: Fault) -> None:
        r = self.rng.choice(self.replicas)
        assert r.proxy is not None
        hold = self.rng.uniform(0.2, 2.0)
        fault.target = f"broker{r.index}<->redis"
        dropped = 0
        end = time.time() + hold
        while time.time() < end:
            dropped += r.proxy.drop()
            await asyncio.sleep(0.1)
        fault.detail = f"{dropped} connections dropped over {hold:.2f}s"

    # ----- clients ------------------------------------------------------------------------

    def broker_now(self, replica: int) -> float:
        return time.time() + self.replicas[replica].offset

    async def call(self, op: Op, coro: Any) -> Any:
        """Run one RPC for ``op``, recording its outcome; returns the reply or None."""
        try:
            reply = await asyncio.wait_for(coro, CALL_TIMEOUT)
        except QuotaExhausted as exc:
            op.complete, op.outcome, op.code = time.time(), FAIL, exc.code.name
            op.result = {"retry_after": exc.retry_after}
            return None
        except BrokerError as exc:
            op.complete, op.code = time.time(), exc.code.name
            op.outcome = UNKNOWN if exc.code.name in UNKNOWN_CODES else FAIL
            op.result = {"reason": exc.reason, "message": exc.message[:120]}
            return None
        except grpc.RpcError as exc:  # a status the client's mapping did not know
            op.complete, op.outcome, op.code = time.time(), FAIL, exc.code().name  # type: ignore[attr-defined]
            return None
        except TimeoutError:
            op.complete, op.outcome, op.code = time.time(), UNKNOWN, "CLIENT_TIMEOUT"
            return None
        op.complete, op.outcome = time.time(), OK
        return reply

    async def client(self, n: int, until: float) -> None:
        rng = random.Random(f"client-{self.plan.seed}-{n}")
        while time.time() < until:
            try:
                await self._one_lease(n, rng)
            except Exception as exc:  # a bug in the campaign itself: stop loudly
                raise RuntimeError(f"client {n} crashed: {exc!r}") from exc

    def _pick(self, rng: random.Random) -> int:
        return rng.randrange(len(self.replicas))

    async def _one_lease(self, n: int, rng: random.Random) -> None:
        who = rng.choice(("alice", "bob"))
        pool = rng.choice(list(POOLS))
        units = rng.choices((1, 2, 3), weights=(7, 2, 1))[0]
        priority = rng.choice(("high", "normal", "low"))
        ttl = float(rng.randint(3, 15))
        request_id = f"rq-{self.plan.seed}-{n}-{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}" \
            if rng.random() < 0.5 else ""
        lease = None
        for _attempt in range(3 if request_id else 1):
            rep = self._pick(rng)
            op = self.history.begin("lease", n, rep, who, time.time(), pool=pool, units=units,
                                    priority=priority, ttl=ttl, request_id=request_id)
            lease = await self.call(op, self.clients[(rep, who)].lease_key(
                pool, units=units, priority=priority, request_id=request_id, ttl=ttl))
            if lease is not None:
                op.result = {"lease_id": lease.lease_id, "account": lease.account,
                             "key_id": lease.key_id,
                             "granted_at": lease.expires_at.timestamp() - ttl}
                self._check_secret(op, lease)
                break
            if op.code == "RESOURCE_EXHAUSTED":
                self.spawn(self._store_room(op, pool, units))
                await asyncio.sleep(min(op.result.get("retry_after", 1.0), 1.0)
                                    + rng.uniform(0, 0.3))
                return
            if op.outcome != UNKNOWN:
                await asyncio.sleep(rng.uniform(0.2, 0.5))
                return
            await asyncio.sleep(rng.uniform(0.05, 0.5))
        if lease is None:
            await asyncio.sleep(rng.uniform(0.2, 0.5))
            return
        if request_id and rng.random() < 0.15:  # a replay of a request that succeeded
            rep = self._pick(rng)
            op = self.history.begin("lease", n, rep, who, time.time(), pool=pool, units=units,
                                    priority=priority, ttl=ttl, request_id=request_id,
                                    replay=True)
            again = await self.call(op, self.clients[(rep, who)].lease_key(
                pool, units=units, priority=priority, request_id=request_id, ttl=ttl))
            if again is not None:
                op.result = {"lease_id": again.lease_id, "account": again.account}
        await asyncio.sleep(rng.uniform(0, 0.4))
        if rng.random() < 0.2:
            rep = self._pick(rng)
            op = self.history.begin("renew", n, rep, who, time.time(), lease_id=lease.lease_id)
            await self.call(op, self.clients[(rep, who)].renew(lease.lease_id, ttl))
        if rng.random() < 0.7:
            await self._report(n, rng, who, lease)
        roll = rng.random()
        if roll < 0.1:
            return  # abandoned: it expires at its TTL and its units stay spent
        used = roll >= 0.4
        tries = 0
        while tries < 3:
            tries += 1
            rep = self._pick(rng)
            op = self.history.begin("complete", n, rep, who, time.time(),
                                    lease_id=lease.lease_id, used=used)
            reply = await self.call(op, self.clients[(rep, who)].complete(lease.lease_id, used))
            if reply is not None:
                op.result = {"refunded": bool(reply.refunded), "state": int(reply.state)}
                if rng.random() < 0.15:
                    continue  # a deliberate retry of a Complete that succeeded
                break
            if op.outcome != UNKNOWN:
                break
            await asyncio.sleep(rng.uniform(0.05, 0.5))

    async def _report(self, n: int, rng: random.Random, who: str, lease: Any) -> None:
        rep = self._pick(rng)
        roll = rng.random()
        fields: dict[str, Any] = {"latency_ms": rng.randint(50, 900)}
        if roll < 0.75:
            status = 200
            fields |= {"prompt_tokens": 10, "completion_tokens": 20}
        elif roll < 0.96:
            status = 429
            reset = self.broker_now(rep) + rng.uniform(0.5, 4.0)
            if abs(reset - minute_window(reset)[1]) < 2.0 or abs(reset % 60) < 2.0:
                reset += 3.0  # mid-minute: a cooldown, never a window reconciliation
            fields |= {"ratelimit_reset_ms": int(reset * 1000), "error_type": "rate_limited"}
        else:
            status = 401
            fields |= {"error_type": "invalid_key"}
        for _ in range(2 if rng.random() < 0.15 else 1):
            op = self.history.begin("report", n, rep, who, time.time(), lease_id=lease.lease_id,
                                    status=status, key_id=lease.key_id)
            await self.call(op, self.clients[(rep, who)].report_usage(
                lease.lease_id, status, **fields))
            rep = self._pick(rng)

    def _check_secret(self, op: Op, lease: Any) -> None:
        if lease.api_key and lease.api_key != self.secrets.get(lease.key_id):
            op.result["wrong_secret"] = True

    async def admin(self, until: float) -> None:
        """An operator: keys disabled by a 401 are enabled again after a while, and now and
        then a key is disabled for a few seconds."""
        rng = random.Random(f"admin-{self.plan.seed}")
        while time.time() < until:
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            kid = rng.choice(KEY_IDS)
            enable = rng.random() < 0.8
            rep = self._pick(rng)
            op = self.history.begin("enable", -1, rep, "admin", time.time(), key_id=kid,
                                    enabled=enable)
            await self.call(op, self.clients[(rep, "admin")].set_key_enabled(
                kid, enable, reason="chaos"))

    async def _store_room(self, op: Op, pool: str, units: int) -> None:
        """After a refusal: did the store, read at once, show room for it on some key?"""
        now = self.broker_now(op.replica)
        day, _ = day_window(now)
        mins, _ = minute_window(now)
        windows = [(a, w) for a in POOLS[pool] for w in (account_day(a, day), account_minute(a, mins))]
        try:
            counts, health = await asyncio.wait_for(self.truth(windows), 1.0)
        except Exception:
            return
        room = False
        for acct, names in POOLS[pool].items():
            if (counts[account_day(acct, day)] + units > DAILY
                    or counts[account_minute(acct, mins)] + units > MINUTE):
                continue
            for name in names:
                own = health.get(key_subject(f"{pool}/{name}"))
                if not blocked(own, health.get(account_subject(acct)), now)[0]:
                    room = True
        op.result["store_room"] = room

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----- after the run ------------------------------------------------------------------

    async def healed_check(self) -> None:
        """Faults healed and every key enabled: each pool the store shows room in grants a
        lease through every replica (each then completed unused, refunding it)."""
        for kid in KEY_IDS:
            op = self.history.begin("enable", -1, 0, "admin", time.time(), key_id=kid,
                                    enabled=True)
            await self.call(op, self.clients[(0, "admin")].set_key_enabled(kid, True, "heal"))
        await asyncio.sleep(5.0)  # cooldowns from 429 reports end within 4.5 s
        # a fresh calendar minute on every replica, so minute limits leave room
        latest = max(self.broker_now(r.index) for r in self.replicas)
        earliest = min(self.broker_now(r.index) for r in self.replicas)
        await asyncio.sleep(minute_window(latest)[1] - earliest + 0.5)
        for pool in POOLS:
            for r in self.replicas:
                probe = self.history.begin("check", -2, r.index, "alice", time.time(),
                                           pool=pool, units=1, ttl=30.0)
                room_op = Op(-1, "room", -2, r.index, "alice", time.time())
                await self._store_room(room_op, pool, 1)
                probe.args["store_room"] = room_op.result.get("store_room")
                lease = await self.call(probe, self.clients[(r.index, "alice")].lease_key(
                    pool, units=1, ttl=30.0))
                if lease is not None:
                    probe.result = {"lease_id": lease.lease_id, "account": lease.account,
                                    "granted_at": lease.expires_at.timestamp() - 30.0}
                    done = self.history.begin("complete", -2, r.index, "alice", time.time(),
                                              lease_id=lease.lease_id, used=False)
                    reply = await self.call(done, self.clients[(r.index, "alice")].complete(
                        lease.lease_id, False))
                    if reply is not None:
                        done.result = {"refunded": bool(reply.refunded)}

    async def metrics_text(self) -> str:
        out = []
        async with httpx.AsyncClient(timeout=5.0) as http:
            for r in self.replicas:
                with contextlib.suppress(httpx.HTTPError):
                    out.append((await http.get(f"http://127.0.0.1:{r.metrics_port}/metrics")).text)
        return "\n".join(out)


async def run_campaign(plan: Plan, workdir: Path) -> Any:
    """Run the campaign and check it; returns the checker's :class:`Result`."""
    from .checker import check

    world = World(plan, workdir)
    started = time.time()
    try:
        await world.start()
        until = time.time() + plan.duration
        tasks = [asyncio.ensure_future(world.client(n, until)) for n in range(plan.clients)]
        tasks.append(asyncio.ensure_future(world.admin(until)))
        nemesis = asyncio.ensure_future(world.nemesis(until))
        await asyncio.gather(*tasks)
        await nemesis
        if world._tasks:
            await asyncio.gather(*world._tasks, return_exceptions=True)
        await world.healed_check()
        metrics = await world.metrics_text()
        # the final state is read with every broker stopped, so nothing moves under it
        for r in world.replicas:
            if r.proc is not None:
                await asyncio.to_thread(r.proc.stop, 10.0)
        result = await check(world, metrics)
        result.elapsed = time.time() - started
        result.figures["bao_restart_retries"] = len(world.bao_failures)
        result.figures["bao_restart_failures"] = world.bao_failures[:5]
        world.history.dump(workdir / "history.jsonl")
        return result
    except BaseException:
        world.history.dump(workdir / "history.jsonl")  # what ran until the campaign broke
        raise
    finally:
        await world.close()
