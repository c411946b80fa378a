"""ListKeys and GetUsage page the AIP-158 way: page_size, page_token, next_page_token."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from keybroker_client import InvalidArgument, KeyBrokerClient, PermissionDenied
from keybroker_client.v1 import keybroker_pb2 as pb

from broker.config import LeaseSettings, QuotaSettings, VaultSettings
from broker.models import Key, Secret
from broker.runtime import Broker
from tests.support import TOKENS, make_settings, wait_until

GRPC_MAX_MESSAGE = 4 * 1024 * 1024  # gRPC's default receive limit


class MemoryKeys:
    """A KeySource holding keys in memory (Vault would take minutes for thousands of keys);
    tests add and remove keys, then call ReloadKeys."""

    def __init__(self) -> None:
        self.keys: dict[str, Key] = {}

    def add(self, pool: str, *names: str) -> None:
        for name in names:
            self.keys[f"{pool}/{name}"] = Key(
                pool=pool, name=name, account=f"acct-{name}",
                secret=Secret(f"sk-or-v1-test-{secrets.token_hex(8)}"))

    def remove(self, *key_ids: str) -> None:
        for key_id in key_ids:
            del self.keys[key_id]

    async def load(self) -> list[Key]:
        return list(self.keys.values())


@pytest.fixture
async def memory_broker(tmp_path: Path, policy_file: Path, clock: Any
                        ) -> AsyncIterator[Callable[..., Awaitable[Broker]]]:
    """start(source, **overrides) -> a real broker (gRPC, SQLite) whose keys come from a
    MemoryKeys."""
    brokers: list[Broker] = []

    async def start(source: MemoryKeys, **overrides: Any) -> Broker:
        settings = make_settings(tmp_path, VaultSettings(), policy_file, **overrides)
        broker = Broker(settings, clock=clock, key_source=source)
        brokers.append(broker)
        await broker.start()
        await wait_until(lambda: broker.engine.ready, timeout=120)
        return broker

    yield start
    for b in brokers:
        await b.stop(0)


def _ids(keys: Any) -> list[str]:
    return [k.key_id for k in keys]


async def _all_pages(admin: Any, pool: str = "", page_size: int = 0) -> list[pb.ListKeysResponse]:
    pages, token = [], ""
    while True:
        page = await admin.list_keys_page(pool, page_size=page_size, page_token=token)
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages


async def test_paging_over_2500_keys_returns_each_key_once(memory_broker, connect):
    """ListKeys with page_size 1000 over 2,500 keys in three pools returns pages of 1000, 1000
    and 500 that hold every key exactly once, in pool-then-name order, and the last page has
    no next_page_token."""
    source = MemoryKeys()
    source.add("free", *(f"k{i:04d}" for i in range(1200)))
    source.add("free-b", *(f"k{i:04d}" for i in range(300)))  # a pool name extending another
    source.add("paid", *(f"k{i:04d}" for i in range(1000)))
    broker = await memory_broker(source)
    admin = connect(broker, "admin")
    pages = await _all_pages(admin, page_size=1000)
    assert [len(p.keys) for p in pages] == [1000, 1000, 500]
    listed = [k.key_id for p in pages for k in p.keys]
    expected = sorted(source.keys, key=lambda i: tuple(i.split("/")))
    assert listed == expected and len(set(listed)) == 2500
    assert [bool(p.next_page_token) for p in pages] == [True, True, False]
    # The client's list_keys and iter_keys follow the pages themselves (default size 1000).
    assert _ids(await admin.list_keys()) == expected
    assert [k.key_id async for k in admin.iter_keys("free", page_size=333)] == expected[:1200]


async def test_page_size_defaults_to_1000_and_is_clamped(memory_broker, connect):
    """page_size 0 answers 1,000 keys with a next_page_token, a page_size above 10,000 is
    lowered to 10,000, and a negative one is INVALID_ARGUMENT."""
    source = MemoryKeys()
    source.add("free", *(f"k{i:05d}" for i in range(10_050)))
    broker = await memory_broker(source)
    admin = connect(broker, "admin")
    first = await admin.list_keys_page("free")
    assert len(first.keys) == 1000 and first.next_page_token
    big = await admin.list_keys_page("free", page_size=1_000_000)
    assert len(big.keys) == 10_000 and big.next_page_token
    rest = await admin.list_keys_page("free", page_size=1_000_000,
                                      page_token=big.next_page_token)
    assert _ids(rest.keys) == [f"free/k{i:05d}" for i in range(10_000, 10_050)]
    assert rest.next_page_token == ""
    with pytest.raises(InvalidArgument) as info:
        await admin.list_keys_page("free", page_size=-1)
    assert info.value.field == "page_size"


async def test_keys_added_or_removed_between_pages_do_not_shift_the_rest(memory_broker,
                                                                          connect):
    """Keys added or removed (and reloaded) between two pages make no key that stayed repeat
    or go missing; a key added after the position is listed, a removed one is not."""
    source = MemoryKeys()
    source.add("free", *(f"k{i:02d}" for i in range(0, 60, 2)))  # k00, k02, ... k58
    broker = await memory_broker(source)
    admin = connect(broker, "admin")
    first = await admin.list_keys_page("free", page_size=10)
    assert _ids(first.keys)[-1] == "free/k18"
    source.remove("free/k04", "free/k18", "free/k20", "free/k40")  # seen, last seen, unseen x2
    source.add("free", "k01", "k19", "k41", "k99")  # before, right after, later, at the end
    await admin.reload_keys()
    rest = [k.key_id async for k in _continue(admin, first.next_page_token, 7)]
    stayed = [f"free/k{i:02d}" for i in range(0, 60, 2) if i not in (4, 18, 20, 40)]
    seen = _ids(first.keys) + rest
    assert all(seen.count(k) == 1 for k in stayed)
    assert rest == sorted(rest) and rest[0] == "free/k19"
    assert {"free/k41", "free/k99"} <= set(rest) and not {"free/k20", "free/k40"} & set(rest)


async def _continue(admin: Any, token: str, size: int) -> AsyncIterator[Any]:
    while token:
        page = await admin.list_keys_page("free", page_size=size, page_token=token)
        for key in page.keys:
            yield key
        token = page.next_page_token


def _tampered(token: str) -> list[str]:
    """Variants of a real token: a flipped character, a changed position with the old
    digest, and structurally odd documents."""
    raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    moved = dict(raw, after=[raw["after"][0], "k00"])

    def enc(doc: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    flip = token[:5] + ("A" if token[5] != "A" else "B") + token[6:]
    return [flip, enc(moved), enc([1, 2]), enc({"v": 1}), enc(dict(raw, after=[1, 2])),
            enc(dict(raw, v=2)), enc(dict(raw, after="free")), token + "=", token + "x",
            "not a token", "\u00e9t\u00e9", "A" * 9000, base64.urlsafe_b64encode(
                b"[" * 5000).decode(), base64.urlsafe_b64encode(b"\xff\xfe").decode()]


async def test_bad_tampered_and_foreign_page_tokens_are_invalid_argument(memory_broker,
                                                                         connect, clock):
    """A page_token that was altered, made up, issued for other filters or for the other
    RPC is INVALID_ARGUMENT naming page_token (never INTERNAL), and changes nothing."""
    source = MemoryKeys()
    source.add("free", *(f"k{i:02d}" for i in range(5)))
    source.add("paid", *(f"k{i:02d}" for i in range(5)))
    broker = await memory_broker(source, quota=QuotaSettings(daily_limit=50, minute_limit=100),
                                 lease=LeaseSettings(sweep_interval=0.05, usage_max_rows=2))
    admin, alice = connect(broker, "admin"), connect(broker, "alice")
    for _ in range(3):
        lease = await alice.lease_key("free")
        await lease.report(http_status=200)
    before = [k.SerializeToString() for k in await admin.list_keys()]
    free = (await admin.list_keys_page("free", page_size=2)).next_page_token
    everywhere = (await admin.list_keys_page("", page_size=2)).next_page_token
    usage = (await admin.usage_page(1, ["key"], "free")).next_page_token
    assert free and everywhere and usage

    async def refused(call: Awaitable[Any]) -> None:
        with pytest.raises(InvalidArgument) as info:
            await call
        assert info.value.field == "page_token"

    for bad in _tampered(free):
        await refused(admin.list_keys_page("free", page_token=bad))
    await refused(admin.list_keys_page("paid", page_token=free))  # other pool
    await refused(admin.list_keys_page("free", page_token=everywhere))
    await refused(admin.usage_page(1, ["key"], "free", page_token=free))  # other RPC
    await refused(admin.list_keys_page("free", page_token=usage))
    await refused(admin.usage_page(2, ["key"], "free", page_token=usage))  # other days
    await refused(admin.usage_page(1, ["account"], "free", page_token=usage))  # other group_by
    await refused(admin.usage_page(1, ["key"], "", page_token=usage))  # other pool
    for bad in _tampered(usage):
        await refused(admin.usage_page(1, ["key"], "free", page_token=bad))
    with pytest.raises(InvalidArgument) as info:
        await admin.usage_page(1, ["key"], "free", page_size=-5)
    assert info.value.field == "page_size"
    # Raw gRPC: the status is INVALID_ARGUMENT itself.
    stub = admin.admin
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListKeys(pb.ListKeysRequest(page_token="%%%"),
                            metadata=(("authorization", f"Bearer {TOKENS['admin']}"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [k.SerializeToString() for k in await admin.list_keys()] == before
    # The good tokens still work after all that.
    assert len((await admin.list_keys_page("free", page_size=2, page_token=free)).keys) == 2


async def test_page_tokens_do_not_widen_access(memory_broker, connect):
    """Access control applies to every page: a token an admin was given is PERMISSION_DENIED
    for a principal without ListKeys, and a consumer's listing never includes other pools."""
    source = MemoryKeys()
    source.add("free", "a", "b", "c")
    source.add("paid", "a", "b", "c")
    source.add("zzz", "a")  # a pool in no role but admin's "*"
    broker = await memory_broker(source)
    admin = connect(broker, "admin")
    token = (await admin.list_keys_page("", page_size=2)).next_page_token
    free = (await admin.list_keys_page("free", page_size=2)).next_page_token
    with pytest.raises(PermissionDenied):
        await connect(broker, "nobody").list_keys_page("", page_token=token)
    with pytest.raises(PermissionDenied):
        await connect(broker, "carol").usage_page(1, ["key"])
    reader = connect(broker, "reader")
    assert len(await reader.list_keys()) == 7
    assert _ids((await reader.list_keys_page("", page_token=token)).keys) == [
        "free/c", "paid/a", "paid/b", "paid/c", "zzz/a"]
    # alice may lease from free and paid but not list keys.
    with pytest.raises(PermissionDenied):
        await connect(broker, "alice").list_keys_page("free", page_token=free)


async def test_get_usage_pages_read_a_wide_range_completely(memory_broker, connect):
    """With lease.usage_max_rows 2, GetUsage answers 2 rows a page and a next_page_token, and
    following the tokens reads all rows in group order; the clients' usage() follows them."""
    source = MemoryKeys()
    source.add("free", *(f"k{i}" for i in range(5)))
    broker = await memory_broker(source, quota=QuotaSettings(daily_limit=50, minute_limit=100),
                                 lease=LeaseSettings(sweep_interval=0.05, usage_max_rows=2))
    alice, admin = connect(broker, "alice"), connect(broker, "admin")
    for _ in range(5):
        lease = await alice.lease_key("free")
        await lease.report(http_status=200)
    pages, token = [], ""
    while True:
        page = await admin.usage_page(1, ["key"], "free", page_size=100, page_token=token)
        pages.append([tuple(r.group) for r in page.rows])
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [g for p in pages for g in p] == [(f"free/k{i}",) for i in range(5)]
    assert sum(r.requests for r in await admin.usage(1, ["key"])) == 5
    assert len([r async for r in admin.iter_usage(1, ["key", "day"], page_size=1)]) == 5
    assert [tuple(r.group) for r in await admin.usage(1, [])] == [()]

    def blocking() -> tuple[int, int, int, int]:  # the sync client, off the broker's loop
        with KeyBrokerClient(f"127.0.0.1:{broker.port}", token=TOKENS["admin"]) as sync:
            return (len(sync.usage(1, ["key"])), len(sync.usage_page(1, ["key"]).rows),
                    len(list(sync.iter_keys("free", page_size=2))), len(sync.list_keys()))

    assert await asyncio.to_thread(blocking) == (5, 2, 5, 5)


@pytest.mark.slow
async def test_100000_keys_page_under_the_grpc_message_limit(memory_broker, connect):
    """ListKeys over 100,000 keys in 50,000 accounts reads them all through pages, each page
    (even at the largest page_size) well under gRPC's 4 MB message limit."""
    source = MemoryKeys()
    for i in range(100_000):
        name = f"key-{i:06d}"
        source.keys[f"free/{name}"] = Key(pool="free", name=name, account=f"acct-{i // 2:05d}",
                                          secret=Secret(f"sk-or-v1-test-{i:06d}"))
    broker = await memory_broker(source)
    admin = connect(broker, "admin")
    pages = await _all_pages(admin, "free", page_size=10_000)
    assert len(pages) == 10
    assert sum(len(p.keys) for p in pages) == 100_000
    assert len({k.key_id for p in pages for k in p.keys}) == 100_000
    largest = max(p.ByteSize() for p in pages)
    assert largest < GRPC_MAX_MESSAGE * 0.75, largest


async def test_keys_with_many_models_make_shorter_pages_not_oversized_ones(memory_broker,
                                                                          connect):
    """Keys listing hundreds of models make ListKeys pages hold fewer keys than page_size,
    each under gRPC's 4 MB limit, and the pages still hold every key exactly once."""
    source = MemoryKeys()
    models = tuple(f"vendor-{i:03d}/a-rather-long-model-name-{i:03d}:free" for i in range(200))
    for i in range(600):  # about 11 kB each: 6.6 MB in all
        name = f"k{i:03d}"
        source.keys[f"free/{name}"] = Key(pool="free", name=name, account=f"acct-{i}",
                                          secret=Secret(f"sk-or-v1-test-{i:03d}"),
                                          models=models)
    broker = await memory_broker(source)
    pages = await _all_pages(connect(broker, "admin"), "free", page_size=10_000)
    assert len(pages) > 1 and all(p.ByteSize() < GRPC_MAX_MESSAGE * 0.8 for p in pages)
    assert [k.key_id for p in pages for k in p.keys] == sorted(source.keys)


async def test_cli_status_and_usage_read_every_page(memory_broker, connect):
    """`keybroker status` shows keys beyond the first page of 1,000, and `keybroker usage`
    prints rows beyond the first page of lease.usage_max_rows."""
    source = MemoryKeys()
    source.add("free", *(f"k{i:04d}" for i in range(1100)))
    broker = await memory_broker(source, quota=QuotaSettings(daily_limit=50, minute_limit=100),
                                 lease=LeaseSettings(sweep_interval=0.05, usage_max_rows=2))
    alice = connect(broker, "alice")
    for _ in range(3):
        lease = await alice.lease_key("free")
        await lease.report(http_status=200)
    exe = str(Path(sys.executable).parent / "keybroker")
    env = {**os.environ, "KEYBROKER_TOKEN": TOKENS["admin"],
           "KEYBROKER_TARGET": f"127.0.0.1:{broker.port}", "COLUMNS": "200"}

    def run(*args: str) -> str:
        return subprocess.run([exe, *args], capture_output=True, text=True, env=env,
                              check=True).stdout

    rows = json.loads(await asyncio.to_thread(run, "usage", "--days", "1", "--by", "key",
                                              "--json"))
    assert len(rows) == 3 and sum(r["requests"] for r in rows) == 3
    status = await asyncio.to_thread(run, "status", "--pool", "free")
    assert "k0000" in status and "k1099" in status
