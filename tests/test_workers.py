"""`keybroker serve --workers N`: one port for N worker processes on one store, exact counts
under kill -9 of a worker, restarts, drains, exclusive ports, one audit chain per worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from keybroker_client import AsyncKeyBrokerClient, BrokerError, Lease, QuotaExhausted

from broker.clock import day_window
from broker.config import VaultSettings
from broker.engine.windows import account_day
from broker.store.redis import RedisStore
from broker.store.sqlite import SQLiteStore
from broker.testing import BaoDevServer, BrokerProcess, RedisServer, free_port
from broker.testing.process import clean_environ, keybroker_argv
from broker.workers import worker_audit_file
from tests.support import POLICY, TOKENS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

POOL = "free"
DAILY = 40
ACCOUNTS = {"acct-a": ("a1", "a2"), "acct-b": ("b1",)}
TOTAL = DAILY * len(ACCOUNTS)
CALLERS = 16
KILL_AFTER = 20
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
"""A channel option: this channel's own TCP connection (gRPC shares one between channels to
the same target by default, and then every caller would land on the same worker)."""


@dataclass
class Setup:
    """A broker process's settings, and where its store's truth is read."""

    env: dict[str, str]
    backend: str
    tmp: Path
    redis: RedisServer | None = None
    prefix: str = ""
    started: list[BrokerProcess] = field(default_factory=list)

    def broker(self, workers: int = 2, name: str = "broker", **env: str) -> BrokerProcess:
        b = BrokerProcess({**self.env, **env}, name=name, workers=workers,
                          log_path=self.tmp / f"{name}.log").start()
        self.started.append(b)
        return b

    async def day_counts(self) -> dict[str, int]:
        day, _ = day_window(time.time())
        store: SQLiteStore | RedisStore = (
            RedisStore(self.redis.url, prefix=self.prefix) if self.redis is not None
            else SQLiteStore(self.tmp / "state.db"))
        try:
            counts = await store.counters([(a, account_day(a, day)) for a in ACCOUNTS])
        finally:
            await store.close()
        return {a: counts[account_day(a, day)] for a in ACCOUNTS}


@pytest.fixture(params=["sqlite", "redis"])
def setup(request: pytest.FixtureRequest, tmp_path: Path, bao: BaoDevServer,
          vault_settings: VaultSettings, put_keys: Callable[..., dict[str, str]]
          ) -> Iterator[Setup]:
    """Three keys on two accounts of DAILY a day, and `keybroker serve` settings on SQLite or
    on this test's own redis-server; every broker started is stopped at the end."""
    put_keys(POOL, [(name, acct) for acct, names in ACCOUNTS.items() for name in names])
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    env = {**clean_environ(),
           "KEYBROKER_POLICY_FILE": str(policy),
           "KEYBROKER_VAULT_ADDR": bao.addr,
           "KEYBROKER_VAULT_TOKEN": bao.root_token,
           "KEYBROKER_VAULT_KEY_PREFIX": vault_settings.key_prefix,
           "KEYBROKER_QUOTA_DAILY_LIMIT": str(DAILY),
           "KEYBROKER_QUOTA_MINUTE_LIMIT": "1000",
           "KEYBROKER_AUDIT_FILE": str(tmp_path / "audit.jsonl"),
           "KEYBROKER_LOG_LEVEL": "info",
           "KEYBROKER_LOG_FORMAT": "json"}
    redis_server = None
    if request.param == "redis":
        redis_server = RedisServer(directory=tmp_path / "redis").start()
        prefix = f"kb{uuid.uuid4().hex[:8]}"
        env.update(KEYBROKER_STORE_BACKEND="redis", KEYBROKER_STORE_REDIS_URL=redis_server.url,
                   KEYBROKER_STORE_REDIS_PREFIX=prefix)
    else:
        prefix = ""
        env["KEYBROKER_STORE_SQLITE_PATH"] = str(tmp_path / "state.db")
    s = Setup(env, request.param, tmp_path, redis_server, prefix)
    try:
        yield s
    finally:
        for b in s.started:
            b.stop()
        if redis_server is not None:
            redis_server.close()


def _serving_workers(b: BrokerProcess) -> list[int]:
    """Pids of the workers that said they serve, in order (restarts included)."""
    return [e["pid"] for e in b.log_events() if e.get("event") == "worker.serving"]


async def _wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


def _loaded(b: BrokerProcess) -> list[int]:
    """The worker slot of each key load that went well, in order (restarts included)."""
    return [e["worker"] for e in b.log_events() if e.get("event") == "keys.loaded"]


async def _wait_both_serving(b: BrokerProcess) -> None:
    """Both workers bound and with their keys loaded (each is SERVING)."""
    await b.wait_serving(timeout=60)
    await _wait_for(lambda: set(_loaded(b)) == {1, 2}, "2 workers with keys loaded")


@dataclass
class Load:
    acked: list[Lease] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    refused: int = 0


async def _lease_until_exhausted(target: str, load: Load, on_grant: Callable[[], None],
                                 callers: int = CALLERS,
                                 until: Callable[[], bool] = lambda: False) -> None:
    """`callers` callers, each on its own channel (so spread over the workers), lease with a
    request_id until the quota is exhausted; a failed call is retried with the same
    request_id (the store replays a grant the caller never heard of) unless ``until()``."""
    clients = [AsyncKeyBrokerClient(target, token=TOKENS["alice" if i % 2 else "bob"],
                                    options=OWN_CONNECTION) for i in range(callers)]

    async def caller(client: AsyncKeyBrokerClient) -> None:
        request_id = uuid.uuid4().hex
        while True:
            try:
                lease = await asyncio.wait_for(
                    client.lease_key(POOL, request_id=request_id, ttl=120), 10)
            except QuotaExhausted:
                load.refused += 1
                return
            except (BrokerError, TimeoutError) as exc:
                load.errors[exc.code.name if isinstance(exc, BrokerError) else "TIMEOUT"] += 1
                if until():
                    return
                await asyncio.sleep(0.05)
                continue
            load.acked.append(lease)
            request_id = uuid.uuid4().hex
            on_grant()

    try:
        await asyncio.wait_for(asyncio.gather(*(caller(c) for c in clients)), 90)
    finally:
        for c in clients:
            await c.close()


async def test_kill9_of_one_worker_mid_load_loses_no_count_and_over_grants_none(setup: Setup):
    """kill -9 of one of 2 workers under 16 callers leasing with request_ids: every count in
    the store was acknowledged and none is over the quota, the other worker kept serving
    the port, and the supervisor restarted the killed one."""
    b = setup.broker(workers=2)
    await _wait_both_serving(b)
    victims = b.worker_pids()
    assert len(victims) == 2
    victim = victims[0]
    load, killed_at = Load(), []

    def maybe_kill() -> None:
        if not killed_at and len(load.acked) >= KILL_AFTER:
            killed_at.append(len(load.acked))
            os.kill(victim, signal.SIGKILL)

    await _lease_until_exhausted(b.target, load, maybe_kill)
    counts = await setup.day_counts()
    ids = [lease.lease_id for lease in load.acked]
    audit = str(setup.tmp / "audit.jsonl")
    by_worker = [Path(worker_audit_file(audit, k)).read_text().count('"lease.granted"')
                 for k in (1, 2)]
    print(f"\n[workers {setup.backend}] killed worker {victim} after {killed_at} grants; "
          f"acknowledged {len(ids)} (audited by worker 1, 2: {by_worker}), store {counts}, "
          f"retried calls {dict(load.errors)}")
    assert all(by_worker)  # both workers served
    assert sum(by_worker) <= TOTAL
    # Every acknowledged lease was handed out with an audit record: a grant the killed worker
    # committed but had not audited is answered by the other worker's replay, audited as such.
    handed_out = set()
    for k in (1, 2):
        for line in Path(worker_audit_file(audit, k)).read_text().splitlines():
            rec = json.loads(line)
            if rec["event"] in ("lease.granted", "lease.replayed"):
                handed_out.add(rec["lease_id"])
    assert set(ids) <= handed_out, set(ids) - handed_out
    assert killed_at and len(ids) - killed_at[0] > 0  # served on after the kill
    assert len(ids) == len(set(ids)) == TOTAL  # 0 over-grants, nothing granted twice
    assert counts == dict.fromkeys(ACCOUNTS, DAILY)  # 0 lost counts, 0 uncounted grants
    assert Counter(lease.account for lease in load.acked) == dict.fromkeys(ACCOUNTS, DAILY)
    assert set(load.errors) <= {"UNAVAILABLE", "TIMEOUT"}, load.errors
    # The supervisor restarts the killed worker.
    await _wait_for(lambda: len(_serving_workers(b)) >= 3 and len(_loaded(b)) >= 3,
                    "the killed worker restarted and loaded its keys")
    now = b.worker_pids()
    assert len(now) == 2 and victim not in now and b.proc.poll() is None


async def test_sigterm_drains_every_worker_and_exits_0(setup: Setup):
    """SIGTERM to the supervisor mid-load: every worker stops, the supervisor exits 0, and
    every grant charged in the store was answered (in-flight calls finished, none cut)."""
    b = setup.broker(workers=2)
    await _wait_both_serving(b)
    workers = b.worker_pids()
    load, stopped = Load(), []

    def maybe_stop() -> None:
        if not stopped and len(load.acked) >= KILL_AFTER:
            stopped.append(len(load.acked))
            b.proc.send_signal(signal.SIGTERM)

    await _lease_until_exhausted(b.target, load, maybe_stop,
                                 until=lambda: b.proc.poll() is not None)
    assert stopped and b.proc.wait(60) == 0
    assert not [p for p in workers if Path(f"/proc/{p}").exists()
                and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
    counts = await setup.day_counts()
    print(f"\n[workers {setup.backend}] SIGTERM after {stopped} grants; acknowledged "
          f"{len(load.acked)}, store {counts}, failed calls {dict(load.errors)}")
    assert sum(counts.values()) == len(load.acked)
    assert "workers.stopped" in {e.get("event") for e in b.log_events()}


def _run(argv: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*keybroker_argv(), *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("setup", ["sqlite"], indirect=True)
async def test_the_port_stays_this_brokers_own(setup: Setup):
    """With `serve --workers 2` running, a second `keybroker serve` (one worker or two) on its
    port exits 1 with 'address already in use', also while a worker restarts, and the first
    keeps serving; an unrelated program's port refuses `serve --workers 2` the same way."""
    b = setup.broker(workers=2)
    await _wait_both_serving(b)
    env = {**setup.env, "KEYBROKER_LISTEN": b.target,
           "KEYBROKER_STORE_SQLITE_PATH": str(setup.tmp / "other.db"),
           "KEYBROKER_AUDIT_FILE": ""}
    os.kill(b.worker_pids()[0], signal.SIGKILL)  # one worker gone: the port is still held
    for workers in ("1", "2"):
        done = _run(["serve", "--workers", workers], env)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, lines
        assert b.target in lines[0] and "address already in use" in lines[0]
    assert await b.health() == 1  # SERVING: the other worker answers
    assert b.proc.poll() is None

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        held = f"127.0.0.1:{other.getsockname()[1]}"
        done = _run(["serve", "--workers", "2"], {**env, "KEYBROKER_LISTEN": held})
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and held in lines[0] and "address already in use" in lines[0]


@pytest.mark.parametrize("setup", ["sqlite"], indirect=True)
async def test_a_worker_that_keeps_dying_at_start_ends_the_supervisor(setup: Setup):
    """A worker killed before it serves, again and again, makes the supervisor give up: exit
    1, one line naming the worker, and no worker left running."""
    b = setup.broker(workers=2)
    seen: set[int] = set()
    deadline = time.monotonic() + 100
    while b.proc.poll() is None:
        assert time.monotonic() < deadline, b.output()[-2000:]
        serving = set(_serving_workers(b))
        for e in b.log_events():
            pid = e.get("pid")
            if (e.get("event") == "worker.started" and e.get("slot") == 1 and pid not in seen
                    and pid not in serving):
                seen.add(pid)
                os.kill(pid, signal.SIGKILL)  # it exists: the supervisor has not reaped it
        await asyncio.sleep(0.02)
    assert b.proc.returncode == 1
    errors = [line for line in b.output().splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "worker 1 died 5 times in a row before serving" in errors[0]
    assert "Traceback" not in b.output()
    assert len(seen) == 5


@pytest.mark.parametrize("setup", ["sqlite"], indirect=True)
async def test_each_worker_keeps_a_verifiable_audit_chain_and_metrics_say_which(setup: Setup):
    """Each worker writes its own hash-chained audit trail (audit.jsonl, audit.w2.jsonl) that
    `keybroker audit verify` accepts, and the supervisor's /metrics holds both workers'
    series, labelled worker="1" and worker="2"."""
    metrics_port = free_port()
    b = setup.broker(workers=2, KEYBROKER_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
    await _wait_both_serving(b)
    load = Load()
    await _lease_until_exhausted(b.target, load, lambda: None, callers=8)
    assert len(load.acked) == TOTAL
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    granted: dict[str, float] = {}
    reporting: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("keybroker_") or 'worker="' not in line:
            continue
        worker = line.split('worker="')[1].split('"')[0]
        if line.startswith("keybroker_key_quota_remaining{"):
            reporting.add(worker)
        if line.startswith("keybroker_leases_total{") and 'decision="granted"' in line:
            granted[worker] = granted.get(worker, 0) + float(line.rsplit(" ", 1)[1])
    assert reporting == {"1", "2"}, text[-2000:]
    assert sum(granted.values()) == TOTAL, granted
    b.stop()
    audit = str(setup.tmp / "audit.jsonl")
    trails = [audit, worker_audit_file(audit, 2)]
    assert trails[1].endswith("audit.w2.jsonl")
    grants = 0
    for trail in trails:
        done = _run(["audit", "verify", trail], clean_environ())
        assert done.returncode == 0, done.stdout + done.stderr
        grants += Path(trail).read_text().count('"lease.granted"')
    assert grants == TOTAL


def test_bad_workers_values_are_one_line_and_exit_2(tmp_path: Path):
    """`--workers 0`, `--workers many` and KEYBROKER_WORKERS=-1 exit 2 with one line naming
    the setting and what it takes."""
    env = {**clean_environ(), "KEYBROKER_LISTEN": f"127.0.0.1:{free_port()}",
           "KEYBROKER_STORE_SQLITE_PATH": str(tmp_path / "s.db")}
    for argv, extra, name in ((["serve", "--workers", "0"], {}, "--workers"),
                              (["serve", "--workers", "many"], {}, "--workers"),
                              (["serve"], {"KEYBROKER_WORKERS": "-1"}, "workers")):
        done = _run(argv, {**env, **extra})
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, done.stderr
        assert len(lines) == 1 and name in lines[0] and "auto" in lines[0], lines
        assert "Traceback" not in done.stderr


def test_worker_count_auto_is_the_cores_this_process_may_use():
    """`auto` is one worker per CPU core this process may run on."""
    from broker.config import worker_count

    assert worker_count("auto") == len(os.sched_getaffinity(0))
    assert worker_count("3") == 3



def test_a_bad_policy_file_stops_serve_with_workers_with_one_line_and_exit_2(tmp_path: Path):
    """`serve --workers 2` with a policy file that is not TOML exits 2 with the one line a
    single broker prints (said once, not once per worker), and leaves no worker running."""
    policy = tmp_path / "policy.toml"
    policy.write_text("this is [not toml")
    env = {**clean_environ(), "KEYBROKER_LISTEN": f"127.0.0.1:{free_port()}",
           "KEYBROKER_POLICY_FILE": str(policy),
           "KEYBROKER_VAULT_ADDR": f"http://127.0.0.1:{free_port()}",
           "KEYBROKER_VAULT_TOKEN": "unused-here",
           "KEYBROKER_STORE_SQLITE_PATH": str(tmp_path / "s.db"),
           "KEYBROKER_LOG_LEVEL": "warning"}
    done = _run(["serve", "--workers", "2"], env, timeout=90)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and str(policy) in lines[0] and "TOML" in lines[0], lines
    assert "Traceback" not in done.stderr + done.stdout
