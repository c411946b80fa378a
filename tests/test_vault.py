"""The Vault/OpenBao key source against a real OpenBao: reloads, outages, AppRole, secrecy."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pickle
import re
import secrets
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import Any

import grpc
import hvac
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from keybroker_client import Unavailable
from keybroker_client.v1 import keybroker_pb2 as pb

from broker.app import KEY_SOURCE_HEALTH
from broker.config import VaultAuth, VaultSettings
from broker.errors import BackendUnavailable, BrokerError, NotFound
from broker.models import Key, Secret
from broker.runtime import Broker
from broker.testing import BaoDevServer, free_port
from broker.vault import VaultAdmin, VaultForbidden, VaultKeySource, VaultSession, translate_errors
from tests.support import TOKENS

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ADMIN = (("authorization", f"Bearer {TOKENS['admin']}"),)


# -- helpers -------------------------------------------------------------------------------


def new_secret() -> str:
    return f"sk-or-v1-test-{secrets.token_hex(20)}"


async def reload_keys(client: Any) -> pb.ReloadKeysResponse:
    return await client.admin.ReloadKeys(pb.ReloadKeysRequest(), metadata=ADMIN)


async def listed(client: Any, pool: str = "") -> dict[str, pb.KeyInfo]:
    resp = await client.admin.ListKeys(pb.ListKeysRequest(pool=pool), metadata=ADMIN)
    return {k.key_id: k for k in resp.keys}


async def lease_round(client: Any, pool: str, n: int) -> dict[str, set[str]]:
    """Lease ``n`` times (refunding each lease); key_id -> the secrets it was leased with."""
    seen: dict[str, set[str]] = {}
    for _ in range(n):
        lease = await client.lease_key(pool)
        seen.setdefault(lease.key_id, set()).add(lease.api_key)
        await client.complete(lease.lease_id, used=False)
    return seen


async def eventually(probe: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool],
                     timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Call ``probe`` until ``ok(result)``; fail with the last result after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            last: Any = await probe()
        except Exception as exc:  # RPC errors (UNAVAILABLE, NOT_FOUND) while converging
            last = exc
        if not isinstance(last, Exception) and ok(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s; last result: {last!r}")
        await asyncio.sleep(interval)


def events(log_lines: Callable[[], list[dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    return [line for line in log_lines() if line.get("event") == name]


def own_settings(server: BaoDevServer, **kw: Any) -> VaultSettings:
    base = VaultSettings(addr=server.addr, token=server.root_token, key_prefix="keys",
                         reload_interval=0.3, timeout=2.0)
    return dataclasses.replace(base, **kw)


def root_client(settings: VaultSettings) -> hvac.Client:
    return hvac.Client(url=settings.addr, token=settings.token)


def token_seconds_left(client: hvac.Client) -> float:
    """Seconds until the client's current token expires (inf for a non-expiring token)."""
    data = client.auth.token.lookup_self()["data"]
    if not data.get("expire_time"):
        return float("inf")
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", data["expire_time"]).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp() - time.time()


@pytest.fixture
async def health() -> Any:
    """health(broker, service) -> the grpc.health.v1 status of that service."""
    channels: dict[int, grpc.aio.Channel] = {}

    async def check(broker: Broker, service: str = "") -> int:
        if broker.port not in channels:
            channels[broker.port] = grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}")
        stub = health_pb2_grpc.HealthStub(channels[broker.port])
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(resp.status)

    yield check
    for channel in channels.values():
        await channel.close()


@pytest.fixture
def own_bao() -> Iterator[Callable[..., BaoDevServer]]:
    """own_bao(port=None, root_token=None, start=True): an OpenBao of this test, closed after."""
    servers: list[BaoDevServer] = []

    def make(port: int | None = None, root_token: str | None = None,
             start: bool = True) -> BaoDevServer:
        server = BaoDevServer(port=port or free_port())
        servers.append(server)
        if root_token:
            server.root_token = root_token
        return server.start() if start else server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def short_role(vault_settings: VaultSettings, vault_admin: VaultAdmin
               ) -> Callable[[str, str], tuple[str, str]]:
    """short_role(ttl, max_ttl) -> (role_id, secret_id) of a fresh AppRole role that carries
    the broker policy `vault bootstrap` writes (scoped to this test's key prefix)."""
    policy_hcl = vault_admin.bootstrap()["policy"]
    root = root_client(vault_settings)
    name = f"kb-test-{vault_settings.key_prefix}"
    root.sys.create_or_update_policy(name=name, policy=policy_hcl)

    def make(ttl: str, max_ttl: str) -> tuple[str, str]:
        root.auth.approle.create_or_update_approle(
            role_name=name, token_policies=[name], token_ttl=ttl, token_max_ttl=max_ttl,
            mount_point=vault_settings.approle_mount)
        role_id = root.auth.approle.read_role_id(
            role_name=name, mount_point=vault_settings.approle_mount)["data"]["role_id"]
        secret_id = root.auth.approle.generate_secret_id(
            role_name=name, mount_point=vault_settings.approle_mount)["data"]["secret_id"]
        return str(role_id), str(secret_id)

    return make


def approle_settings(vault_settings: VaultSettings, role_id: str, secret_id: str,
                     **kw: Any) -> VaultSettings:
    return dataclasses.replace(vault_settings, auth=VaultAuth.APPROLE, token="",
                               role_id=role_id, secret_id=secret_id, **kw)


# -- 1. reloads ------------------------------------------------------------------------------


HVAC_PATCH_WARNING = "ignore:The raise_on_deleted_version parameter:DeprecationWarning"


@pytest.mark.filterwarnings(HVAC_PATCH_WARNING)  # see test_admin_patches_raise_no_warning
async def test_reload_applies_added_removed_disabled_and_rotated_keys(
        start_broker, put_keys, vault_admin, connect):
    """ReloadKeys picks up a new, a removed, a Vault-disabled and a rotated key without restart."""
    old = put_keys("free", [("k1", ""), ("k2", ""), ("k3", "")])
    broker = await start_broker()
    alice, admin = connect(broker, "alice"), connect(broker, "admin")
    before = await lease_round(alice, "free", 6)
    assert before == {kid: {s} for kid, s in old.items()}

    k4 = new_secret()
    vault_admin.put_key("free", "k4", k4)
    vault_admin.remove_key("free", "k2")
    vault_admin.set_enabled("free", "k3", False)
    rotated = new_secret()
    vault_admin.put_key("free", "k1", rotated)

    # Nothing changes until the reload.
    assert await lease_round(alice, "free", 3) == {kid: {s} for kid, s in old.items()}

    result = await reload_keys(admin)
    assert (result.added, result.removed, result.updated, result.total) == (1, 1, 2, 3)

    after = await lease_round(alice, "free", 8)
    assert after == {"free/k1": {rotated}, "free/k4": {k4}}
    keys = await listed(admin, "free")
    assert set(keys) == {"free/k1", "free/k3", "free/k4"}
    assert not keys["free/k3"].enabled
    assert keys["free/k3"].health == pb.KEY_HEALTH_DISABLED
    assert keys["free/k3"].health_reason == "vault"
    assert keys["free/k1"].enabled and keys["free/k4"].enabled
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.admin.GetKey(pb.GetKeyRequest(key_id="free/k2"), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # Re-enabling in Vault brings k3 back on the next reload.
    vault_admin.set_enabled("free", "k3", True)
    await reload_keys(admin)
    assert (await lease_round(alice, "free", 6)).keys() == {"free/k1", "free/k3", "free/k4"}


def test_admin_patches_raise_no_warning(put_keys, vault_admin):
    """VaultAdmin.set_enabled and rewrap work without warnings (this suite turns them into errors)."""
    put_keys("free", [("k1", "")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vault_admin.set_enabled("free", "k1", False)
        vault_admin.rewrap()
    assert [r.enabled for r in vault_admin.list_keys()] == [False]
    assert [str(w.message)[:60] for w in caught] == []


async def test_periodic_reload_picks_up_changes_without_reload_rpc(
        start_broker, put_keys, vault_admin, vault_settings, connect):
    """With a short reload_interval a key added or removed in Vault shows up on its own."""
    put_keys("free", [("k1", "")])
    broker = await start_broker(vault=dataclasses.replace(vault_settings, reload_interval=0.3))
    alice, admin = connect(broker, "alice"), connect(broker, "admin")
    secret = new_secret()
    vault_admin.put_key("free", "k2", secret)
    await eventually(lambda: listed(admin, "free"), lambda keys: "free/k2" in keys, timeout=5)
    assert {secret} == (await lease_round(alice, "free", 4))["free/k2"]
    vault_admin.remove_key("free", "k1")
    await eventually(lambda: listed(admin, "free"), lambda keys: set(keys) == {"free/k2"},
                     timeout=5)
    assert (await lease_round(alice, "free", 4)).keys() == {"free/k2"}


# -- 2. outage at runtime --------------------------------------------------------------------


async def test_vault_outage_serves_cached_keys_and_recovers(
        start_broker, own_bao, connect, health, log_lines):
    """While Vault is down the broker leases cached keys, says so, and recovers when it returns."""
    server = own_bao()
    settings = own_settings(server)
    admin_v = VaultAdmin(VaultSession(settings))
    admin_v.bootstrap()
    a, b = new_secret(), new_secret()
    admin_v.put_key("free", "a", a)
    admin_v.put_key("free", "b", b)
    broker = await start_broker(vault=settings)
    alice, admin = connect(broker, "alice"), connect(broker, "admin")
    assert await health(broker, KEY_SOURCE_HEALTH) == SERVING

    server.stop()

    assert await lease_round(alice, "free", 4) == {"free/a": {a}, "free/b": {b}}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reload_keys(admin)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    await eventually(lambda: health(broker, KEY_SOURCE_HEALTH), lambda s: s == NOT_SERVING)
    assert await health(broker, "") == SERVING
    assert await health(broker, "keybroker.v1.KeyBroker") == SERVING
    failed = events(log_lines, "keys.reload_failed")
    assert failed, "no log line records the failed reload"
    assert failed[-1]["serving_cached"] is True
    assert await lease_round(alice, "free", 2) == {"free/a": {a}, "free/b": {b}}

    # OpenBao returns on the same address with the same root token, but empty (in memory).
    back = own_bao(port=server.port, root_token=server.root_token)
    admin_v = VaultAdmin(VaultSession(settings))
    admin_v.bootstrap()
    c = new_secret()
    admin_v.put_key("free", "a", a)
    admin_v.put_key("free", "c", c)
    assert back.addr == settings.addr

    await eventually(lambda: health(broker, KEY_SOURCE_HEALTH), lambda s: s == SERVING)
    await eventually(lambda: listed(admin, "free"), lambda keys: set(keys) == {"free/a", "free/c"})
    assert await lease_round(alice, "free", 4) == {"free/a": {a}, "free/c": {c}}
    assert await health(broker, "") == SERVING
    assert (await reload_keys(admin)).total == 2
    names = [line.get("event") for line in log_lines()]
    last_failure = len(names) - 1 - names[::-1].index("keys.reload_failed")
    assert "keys.loaded" in names[last_failure:], "no log line records the recovery"
    raw = log_lines.raw.getvalue()
    assert a not in raw and b not in raw and c not in raw


# -- 3. start-up with Vault down -------------------------------------------------------------


async def test_startup_with_vault_down_waits_then_serves(
        start_broker, own_bao, connect, health, log_lines):
    """Started while Vault is unreachable the broker is NOT_SERVING, then serves once it is up."""
    server = own_bao(start=False)  # its address is reserved, nothing listens yet
    settings = own_settings(server, reload_interval=0.4)
    broker = await start_broker(wait_ready=False, vault=settings)
    alice = connect(broker, "alice")
    await asyncio.sleep(0.8)  # a few failed load attempts

    assert not broker.engine.ready
    assert await health(broker, "") == NOT_SERVING
    assert await health(broker, KEY_SOURCE_HEALTH) == NOT_SERVING
    with pytest.raises(Unavailable) as err:
        await alice.lease_key("free")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    # The operator must be able to see why the broker is not serving.
    failed = [e for e in events(log_lines, "keys.reload_failed") if e.get("serving_cached") is False]
    startup_failure_logged = bool(failed)

    server.start()
    admin_v = VaultAdmin(VaultSession(settings))
    admin_v.bootstrap()
    secret = new_secret()
    admin_v.put_key("free", "k1", secret)

    await eventually(lambda: health(broker, ""), lambda s: s == SERVING)
    lease = await eventually(lambda: alice.lease_key("free"), lambda _: True)
    assert (lease.key_id, lease.api_key) == ("free/k1", secret)
    assert await health(broker, KEY_SOURCE_HEALTH) == SERVING
    assert startup_failure_logged, ("no log line says the first key load failed while Vault "
                                    "was unreachable at start-up")


# -- 4. AppRole ------------------------------------------------------------------------------


async def drive_maintain(session: VaultSession, source: VaultKeySource, expect: dict[str, str],
                         until_relogins: int, limit: float) -> list[str]:
    """Run maintain() as the broker does; check every wait ends before the token expires and
    that keys load after every step. Returns the tokens seen, in order."""
    tokens = [session.client().token]
    deadline = time.monotonic() + limit
    relogins = 0
    while time.monotonic() < deadline:
        before = session.client().token
        wait = await asyncio.to_thread(session.maintain)
        client = session.client()
        left = await asyncio.to_thread(token_seconds_left, client)
        assert wait < left, (f"maintain() asks to run again in {wait:.2f}s but the token "
                             f"expires in {left:.2f}s")
        keys = await source.load()
        assert {k.key_id: k.secret.reveal() for k in keys} == expect
        if client.token != before:
            relogins += 1
            tokens.append(client.token)
            if relogins >= until_relogins:
                return tokens
        await asyncio.sleep(wait)
    raise AssertionError(f"only {relogins} re-login(s) within {limit}s")


async def test_approle_session_renews_and_relogs_in_at_max_ttl(
        vault_settings, short_role, put_keys, log_lines):
    """An AppRole session renews its token before expiry and logs in again at the max TTL."""
    expect = put_keys("free", [("k1", "")])
    role_id, secret_id = short_role("2s", "4s")
    session = VaultSession(approle_settings(vault_settings, role_id, secret_id))
    source = VaultKeySource(session)
    assert {k.key_id: k.secret.reveal() for k in await source.load()} == expect
    assert session.client().token not in ("", vault_settings.token)

    tokens = await drive_maintain(session, source, expect, until_relogins=1, limit=8)
    assert len(set(tokens)) == 2
    assert events(log_lines, "vault.token_renewed")
    assert [e["reason"] for e in events(log_lines, "vault.relogin")] == ["max_ttl"]
    assert [e["auth"] for e in events(log_lines, "vault.login")] == ["approle", "approle"]


async def test_approle_token_is_least_privilege(vault_settings, short_role, put_keys):
    """The broker's AppRole token reads and decrypts keys but cannot write them."""
    put_keys("free", [("k1", "")])
    role_id, secret_id = short_role("1h", "2h")
    admin = VaultAdmin(VaultSession(approle_settings(vault_settings, role_id, secret_id)))
    assert [r.name for r in admin.list_keys()] == ["k1"]
    with pytest.raises(BackendUnavailable, match="permission denied"):
        admin.put_key("free", "k2", new_secret())


async def test_broker_with_approle_serves_keys_across_token_max_ttl(
        start_broker, vault_settings, short_role, put_keys, vault_admin, connect, health,
        log_lines):
    """A broker on AppRole auth leases keys and keeps reloading them past its token's max TTL."""
    expect = put_keys("free", [("k1", "")])
    role_id, secret_id = short_role("2s", "4s")
    settings = approle_settings(vault_settings, role_id, secret_id, reload_interval=0.3)
    broker = await start_broker(vault=settings)
    alice, admin = connect(broker, "alice"), connect(broker, "admin")
    assert await lease_round(alice, "free", 2) == {"free/k1": {expect["free/k1"]}}

    statuses = []
    end = time.monotonic() + 6.5  # well past the 4s max TTL of the first token
    while time.monotonic() < end:
        statuses.append(await health(broker, KEY_SOURCE_HEALTH))
        await asyncio.sleep(0.2)
    failed = [e["error"] for e in events(log_lines, "keys.reload_failed")]
    assert set(statuses) == {SERVING} and not failed, (
        f"key reloads failed while the AppRole token aged: {failed[:1]}")
    assert len(events(log_lines, "vault.login")) >= 2

    k2 = new_secret()
    vault_admin.put_key("free", "k2", k2)
    await eventually(lambda: listed(admin, "free"), lambda keys: "free/k2" in keys, timeout=5)
    assert (await lease_round(alice, "free", 4))["free/k2"] == {k2}


# -- 5. plaintext only in memory -------------------------------------------------------------


async def test_plaintext_exists_only_in_broker_memory(
        start_broker, put_keys, vault_admin, vault_settings, connect, tmp_path, log_lines):
    """Vault stores only Transit ciphertext; state files, logs, admin replies and reprs hide it."""
    old = put_keys("free", [("k1", "acct-a")])["free/k1"]
    current = {**put_keys("free", [("k2", "")]), "free/k1": new_secret()}
    vault_admin.put_key("free", "k1", current["free/k1"], account="acct-a")  # version 2
    all_secrets = [old, *current.values()]
    broker = await start_broker()
    alice, admin = connect(broker, "alice"), connect(broker, "admin")
    seen = await lease_round(alice, "free", 4)
    assert seen == {kid: {s} for kid, s in current.items()}

    root = root_client(vault_settings)
    mount, prefix = vault_settings.kv_mount, vault_settings.key_prefix
    stored = []
    for name, versions in (("k1", (1, 2)), ("k2", (1,))):
        path = f"{prefix}/free/{name}"
        meta = root.secrets.kv.v2.read_secret_metadata(path=path, mount_point=mount)
        stored.append(json.dumps(meta["data"]))
        for version in versions:
            data = root.secrets.kv.v2.read_secret_version(
                path=path, version=version, mount_point=mount,
                raise_on_deleted_version=True)["data"]["data"]
            assert re.fullmatch(r"vault:v\d+:[A-Za-z0-9+/=]+", data["ciphertext"])
            stored.append(json.dumps(data))
    for blob in stored:
        for s in all_secrets:
            assert s not in blob

    for f in tmp_path.iterdir():  # the SQLite state (db, -wal, -shm)
        if f.is_file():
            content = f.read_bytes()
            assert not any(s.encode() in content for s in all_secrets), f.name
    raw_logs = log_lines.raw.getvalue()
    assert log_lines() and not any(s in raw_logs for s in all_secrets)
    listing = await admin.admin.ListKeys(pb.ListKeysRequest(), metadata=ADMIN)
    one = await admin.admin.GetKey(pb.GetKeyRequest(key_id="free/k1"), metadata=ADMIN)
    for reply in (listing, one):
        assert not any(s.encode() in reply.SerializeToString() for s in all_secrets)

    keys = {k.key_id: k for k in await VaultKeySource(VaultSession(vault_settings)).load()}
    key = keys["free/k1"]
    assert isinstance(key, Key) and key.secret.reveal() == current["free/k1"]
    for text in (repr(key), str(key), repr(key.secret), str(key.secret), f"{key.secret}",
                 repr(list(keys.values()))):
        assert current["free/k1"] not in text and current["free/k2"] not in text
    with pytest.raises(TypeError):
        pickle.dumps(key.secret)
    assert vault_settings.token not in repr(vault_settings)
    assert repr(Secret("sk-visible")) == "Secret('**********')"


def test_transit_key_of_bootstrap_is_aes256_gcm96(vault_settings):
    """`vault bootstrap` creates the Transit key as aes256-gcm96, as the design requires."""
    root = root_client(vault_settings)
    key = root.secrets.transit.read_key(name=vault_settings.transit_key,
                                        mount_point=vault_settings.transit_mount)
    assert key["data"]["type"] == "aes256-gcm96"
    assert not key["data"]["exportable"]




async def test_pool_emptied_in_vault_stays_known_and_is_exhausted(start_broker, put_keys, connect,
                                                                   vault_admin, log_lines):
    """When a reload drops every key of a pool, LeaseKey says exhausted (not NOT_FOUND) and a
    warning record is written."""
    from keybroker_client import QuotaExhausted

    put_keys("free", [("k1", "acct-a"), ("k2", "acct-b")])
    broker = await start_broker()
    client = connect(broker)
    await client.lease_key("free")
    vault_admin.remove_key("free", "k1")
    vault_admin.remove_key("free", "k2")
    await connect(broker, "admin").reload_keys()
    with pytest.raises(QuotaExhausted) as info:
        await client.lease_key("free")
    assert info.value.retry_after == broker.settings.vault.reload_interval
    assert any(x.get("event") == "keys.mass_removal" for x in log_lines())


# Every class hvac.exceptions defines, and what translate_errors makes of it. A class added by
# a new hvac release fails test_every_hvac_and_requests_error_is_mapped until it is listed here.
HVAC_ERRORS = {
    "BadGateway": BackendUnavailable, "Forbidden": VaultForbidden,
    "InternalServerError": BackendUnavailable, "InvalidPath": NotFound,
    "InvalidRequest": BackendUnavailable, "ParamValidationError": BackendUnavailable,
    "PreconditionFailed": BackendUnavailable, "RateLimitExceeded": BackendUnavailable,
    "Unauthorized": BackendUnavailable, "UnexpectedError": BackendUnavailable,
    "UnsupportedOperation": BackendUnavailable, "VaultDown": BackendUnavailable,
    "VaultError": BackendUnavailable, "VaultNotInitialized": BackendUnavailable,
}


def _error_classes(module: Any, root: type[BaseException]) -> dict[str, type[BaseException]]:
    return {name: cls for name, cls in vars(module).items()
            if isinstance(cls, type) and issubclass(cls, root)}


def test_every_hvac_and_requests_error_is_mapped():
    """Each hvac.exceptions class and each requests RequestException class raised inside
    translate_errors becomes the BrokerError the one mapping names (vault errors say so)."""
    import requests.exceptions

    hvac_classes = _error_classes(hvac.exceptions, BaseException)
    hvac_classes = {n: c for n, c in hvac_classes.items() if c.__module__ == "hvac.exceptions"}
    assert sorted(hvac_classes) == sorted(HVAC_ERRORS)
    request_classes = _error_classes(requests.exceptions, requests.exceptions.RequestException)
    assert len(request_classes) > 15
    cases: list[tuple[BaseException, type[BrokerError]]] = [
        (cls("boom"), HVAC_ERRORS[name]) for name, cls in hvac_classes.items()]
    for cls in request_classes.values():
        exc = cls("boom", "doc", 0) if issubclass(cls, json.JSONDecodeError) else cls("boom")
        cases.append((exc, BackendUnavailable))
    for exc, expected in cases:
        with pytest.raises(BrokerError) as info, translate_errors("read keys"):
            raise exc
        assert type(info.value) is expected, (type(exc), type(info.value))
        assert info.value.__cause__ is None and "boom" not in info.value.message
        if isinstance(info.value, BackendUnavailable):
            assert info.value.backend == "vault"
