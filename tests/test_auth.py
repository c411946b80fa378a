"""Access control against real brokers: authentication (bearer tokens, mTLS), the RBAC
matrix, deny by default, policy reload without restart, audit of denials and hashed tokens."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import product
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from keybroker_client import BrokerError
from keybroker_client.v1 import keybroker_pb2 as pb
from keybroker_client.v1 import keybroker_pb2_grpc as pb_grpc

from broker.auth import KEY_ADMIN_RPCS, KEY_BROKER_RPCS, Policy, hash_token, new_token, parse_bearer
from broker.clock import ManualClock
from broker.config import QuotaSettings, TlsSettings, VaultSettings
from broker.errors import InvalidArgument, Unauthenticated
from broker.runtime import Broker
from broker.testing import PolicyBuilder
from broker.vault import VaultAdmin, VaultSession
from tests.support import POLICY, T0, TOKENS, make_settings

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
NOT_FOUND = grpc.StatusCode.NOT_FOUND

# The RPCs come from the proto's service descriptors, so a new RPC joins every test below.
SERVICES = {name: pb.DESCRIPTOR.services_by_name[name] for name in ("KeyBroker", "KeyAdmin")}
SERVICE_OF = {m.name: service for service, d in SERVICES.items() for m in d.methods}
ALL_RPCS = tuple(SERVICE_OF)
LEASE_RPCS = tuple(m.name for m in SERVICES["KeyBroker"].methods)
# The lease RPCs that act on an existing lease: their request names one.
LEASE_ID_RPCS = tuple(m.name for m in SERVICES["KeyBroker"].methods
                      if "lease_id" in m.input_type.fields_by_name)
KEY_NAMES = {"free": "k1", "paid": "p1"}
UNKNOWN_LEASE = "ls_" + "0" * 32

# Extra principals for tests that need roles the shared POLICY lacks (test-only tokens).
EXTRA_TOKENS = {name: f"kbt_test_{name}_{'y' * 24}" for name in ("dave", "erin", "frank")}
EXTRA_POLICY = (
    PolicyBuilder()
    .role("lease_only", rpcs=["LeaseKey"], pools=["free"])
    .role("free_reader", rpcs=["ListKeys", "GetKey"], pools=["free"])
    .role("free_operator", rpcs=["*"], pools=["free"])
    .principal("dave", EXTRA_TOKENS["dave"], roles=["lease_only"])
    .principal("erin", EXTRA_TOKENS["erin"], roles=["free_reader"])
    .principal("frank", EXTRA_TOKENS["frank"], roles=["free_operator"])
    .to_toml())

MTLS_CN = "svc-mtls"
MTLS_POLICY = PolicyBuilder().principal("svc-mtls", mtls_cn=MTLS_CN,
                                        roles=["free_consumer"]).to_toml()


# -- helpers ---------------------------------------------------------------------------------


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def as_(who: str) -> tuple[tuple[str, str], ...]:
    """Metadata authenticating as a principal of the shared or the extra policy."""
    return bearer({**TOKENS, **EXTRA_TOKENS}[who])


async def status_of(call: Awaitable[Any]) -> grpc.StatusCode:
    """The status code a call ends with (OK when it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return OK


def error_reason(err: grpc.aio.AioRpcError) -> str:
    """The google.rpc.ErrorInfo reason of a failed call, or ""."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info.reason
    return ""


def write_policy(path: Path, text: str) -> None:
    """Replace the policy file atomically and move its mtime forward so a reload is seen."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    old = path.stat().st_mtime_ns if path.exists() else 0
    os.replace(tmp, path)
    later = max(old, path.stat().st_mtime_ns) + 5_000_000_000
    os.utime(path, ns=(later, later))


async def eventually(probe: Callable[[], Awaitable[bool]], timeout: float = 6.0) -> None:
    """Poll ``probe`` until it returns True or fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await probe():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.1)


@dataclass
class Stubs:
    broker: pb_grpc.KeyBrokerStub
    admin: pb_grpc.KeyAdminStub

    def rpc(self, name: str) -> Callable[..., Any]:
        """The stub method of RPC ``name``, on the service the proto declares it in."""
        return getattr(self.broker if SERVICE_OF[name] == "KeyBroker" else self.admin, name)


def stubs_on(channel: grpc.aio.Channel) -> Stubs:
    return Stubs(pb_grpc.KeyBrokerStub(channel), pb_grpc.KeyAdminStub(channel))


@pytest.fixture
async def raw() -> AsyncIterator[Callable[..., Stubs]]:
    """raw(broker, credentials=None) -> raw stubs on a fresh channel (metadata per call)."""
    channels: list[grpc.aio.Channel] = []

    def make(broker: Broker, credentials: grpc.ChannelCredentials | None = None) -> Stubs:
        target = f"127.0.0.1:{broker.port}"
        channel = (grpc.aio.secure_channel(target, credentials) if credentials
                   else grpc.aio.insecure_channel(target))
        channels.append(channel)
        return stubs_on(channel)

    yield make
    for channel in channels:
        await channel.close()


@pytest.fixture
async def two_pools(start_broker, put_keys) -> Broker:
    """A broker on the shared POLICY with one key in pool free and one in pool paid."""
    for pool, name in KEY_NAMES.items():
        put_keys(pool, [(name, "")])
    return await start_broker()


# Tests on the module's one broker run on the module's event loop, where its server lives.
on_shared_broker = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_broker(bao, tmp_path_factory) -> AsyncIterator[Broker]:
    """One broker for the module like ``two_pools`` (the shared POLICY, keys free/k1 and
    paid/p1), with quotas no test here can exhaust, so its tests do not depend on each other."""
    root = tmp_path_factory.mktemp("shared-broker")
    vault = VaultSettings(addr=bao.addr, token=bao.root_token,
                          key_prefix=f"t-{uuid.uuid4().hex[:12]}", reload_interval=3600.0)
    for pool, name in KEY_NAMES.items():
        VaultAdmin(VaultSession(vault)).put_key(pool, name,
                                                f"sk-or-v1-test-{secrets.token_hex(20)}")
    policy = root / "policy.toml"
    policy.write_text(POLICY)
    settings = make_settings(root, vault, policy,
                             quota=QuotaSettings(daily_limit=100_000, minute_limit=100_000))
    broker = Broker(settings, clock=ManualClock(T0))

    async def ready() -> bool:
        return broker.engine.ready

    try:
        await broker.start()
        await eventually(ready, timeout=10.0)
        yield broker
    finally:
        await broker.stop(0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(shared_broker) -> AsyncIterator[Stubs]:
    """Raw stubs (metadata per call) on one channel to the module's shared broker."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{shared_broker.port}") as channel:
        yield stubs_on(channel)


@pytest.fixture
async def extra_broker(tmp_path, start_broker, put_keys) -> Broker:
    """A broker whose policy is POLICY plus dave (LeaseKey only), erin, frank (free only)."""
    for pool, name in KEY_NAMES.items():
        put_keys(pool, [(name, "")])
    path = tmp_path / "extra-policy.toml"
    path.write_text(POLICY + EXTRA_POLICY)
    return await start_broker(policy_file=str(path))


# -- 1. the RBAC matrix ----------------------------------------------------------------------

# The pools each RPC is tried on ("" = no pool in the request) and the request it sends for
# a pool; a lease RPC gets the id of a real lease on that pool.
MATRIX_POOLS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(LEASE_RPCS, ("free", "paid")),
    "ListKeys": ("free", "paid", ""),
    "GetKey": ("free", "paid"),
    "SetKeyEnabled": ("free", "paid"),
    "ReloadKeys": ("",),
    "GetUsage": ("free", "paid", ""),
    "ClearCooldown": ("free", "paid"),
    "RotateKey": ("free", "paid"),
    "RevokeKey": ("free", "paid"),
    "ProvisionKeys": ("free", "paid"),
}
MATRIX_REQUESTS: dict[str, Callable[[str, str], Message]] = {
    "LeaseKey": lambda pool, lease_id: pb.LeaseKeyRequest(pool=pool),
    "RenewLease": lambda pool, lease_id: pb.RenewLeaseRequest(lease_id=lease_id),
    "ReportUsage": lambda pool, lease_id: pb.ReportUsageRequest(lease_id=lease_id,
                                                                http_status=200),
    "Complete": lambda pool, lease_id: pb.CompleteRequest(lease_id=lease_id, used=True),
    "ListKeys": lambda pool, lease_id: pb.ListKeysRequest(pool=pool),
    "GetKey": lambda pool, lease_id: pb.GetKeyRequest(key_id=f"{pool}/{KEY_NAMES[pool]}"),
    "SetKeyEnabled": lambda pool, lease_id: pb.SetKeyEnabledRequest(
        key_id=f"{pool}/{KEY_NAMES[pool]}", enabled=True, reason="rbac"),
    "ReloadKeys": lambda pool, lease_id: pb.ReloadKeysRequest(),
    "GetUsage": lambda pool, lease_id: pb.GetUsageRequest(days=1, pool=pool),
    "ClearCooldown": lambda pool, lease_id: pb.ClearCooldownRequest(
        key_id=f"{pool}/{KEY_NAMES[pool]}", reason="rbac"),
    # The key lifecycle RPCs act on the provider; here they name what does not exist, so a
    # permitted call passes the permission check and ends NOT_FOUND, changing nothing.
    "RotateKey": lambda pool, lease_id: pb.RotateKeyRequest(key_id=f"{pool}/ghost"),
    "RevokeKey": lambda pool, lease_id: pb.RevokeKeyRequest(key_id=f"{pool}/ghost"),
    "ProvisionKeys": lambda pool, lease_id: pb.ProvisionKeysRequest(account="acct-ghost",
                                                                    pool=pool),
}
# What a permitted call answers, where it is not OK.
PERMITTED = {"RotateKey": NOT_FOUND, "RevokeKey": NOT_FOUND, "ProvisionKeys": NOT_FOUND}
CELLS: list[tuple[str, str]] = [(rpc, pool) for rpc in ALL_RPCS
                                for pool in MATRIX_POOLS.get(rpc, ())]
ALLOWED: dict[str, set[tuple[str, str]]] = {
    "alice": set(product(LEASE_RPCS, ("free", "paid"))),
    "bob": set(product(LEASE_RPCS, ("free", "paid"))),
    "carol": set(product(LEASE_RPCS, ("free",))),
    "reader": {("ListKeys", "free"), ("ListKeys", "paid"), ("ListKeys", ""),
               ("GetKey", "free"), ("GetKey", "paid")},
    "admin": set(CELLS),
    "nobody": set(),
}
assert set(ALLOWED) == set(TOKENS)
MATRIX = [
    pytest.param(who, rpc, pool,
                 PERMITTED.get(rpc, OK) if (rpc, pool) in ALLOWED[who] else DENIED,
                 id=f"{who}-{rpc}-{pool or 'all'}")
    for who in TOKENS for rpc, pool in CELLS
]


def test_matrix_covers_every_rpc_of_the_proto():
    """The RBAC matrix has pools and a request for exactly the RPCs the proto's KeyBroker and
    KeyAdmin services declare, so a new RPC fails here until the matrix covers it."""
    assert set(MATRIX_POOLS) == set(ALL_RPCS)
    assert set(MATRIX_REQUESTS) == set(ALL_RPCS)
    assert {rpc for rpc, _ in CELLS} == set(ALL_RPCS)
    for rpc in ALL_RPCS:
        pool = MATRIX_POOLS[rpc][0]
        request = MATRIX_REQUESTS[rpc](pool, UNKNOWN_LEASE)
        assert request.DESCRIPTOR is SERVICES[SERVICE_OF[rpc]].methods_by_name[rpc].input_type


def test_policy_rpc_names_are_the_proto_methods():
    """The policy's service aliases ("KeyBroker/*", "KeyAdmin/*") name exactly the methods of
    each service in the proto."""
    assert set(KEY_BROKER_RPCS) == {m.name for m in SERVICES["KeyBroker"].methods}
    assert set(KEY_ADMIN_RPCS) == {m.name for m in SERVICES["KeyAdmin"].methods}


async def call_rpc(stubs: Stubs, who: str, rpc: str, pool: str) -> grpc.StatusCode:
    """Call ``rpc`` on ``pool`` as ``who``; lease RPCs act on a real lease taken first, by
    ``who`` when it may lease from the pool and otherwise by admin (someone else's lease)."""
    lease_id = ""
    if rpc in LEASE_ID_RPCS:
        owner = who if ("LeaseKey", pool) in ALLOWED[who] else "admin"
        lease = await stubs.broker.LeaseKey(pb.LeaseKeyRequest(pool=pool), metadata=as_(owner))
        assert lease.key_id == f"{pool}/{KEY_NAMES[pool]}"
        lease_id = lease.lease_id
    request = MATRIX_REQUESTS[rpc](pool, lease_id)
    return await status_of(stubs.rpc(rpc)(request, metadata=as_(who)))


@on_shared_broker
@pytest.mark.parametrize(("who", "rpc", "pool", "expected"), MATRIX)
async def test_rbac_matrix(shared, who, rpc, pool, expected):
    """Each principal gets exactly the RPCs its roles grant on each pool and PERMISSION_DENIED
    for everything else."""
    assert await call_rpc(shared, who, rpc, pool) == expected


@pytest.mark.parametrize("rpc", LEASE_ID_RPCS)
@pytest.mark.parametrize("intruder", ["bob", "admin"])
async def test_lease_of_another_principal_is_refused_and_unchanged(two_pools, raw, connect,
                                                                   intruder, rpc):
    """Renew, report and complete on another principal's lease are PERMISSION_DENIED, even
    for a principal granted the RPC on that pool, and leave the lease untouched."""
    stubs = raw(two_pools)
    alice = connect(two_pools, "alice")
    lease = await alice.lease_key("free")
    requests = {
        "RenewLease": pb.RenewLeaseRequest(lease_id=lease.lease_id),
        "ReportUsage": pb.ReportUsageRequest(lease_id=lease.lease_id, http_status=401),
        "Complete": pb.CompleteRequest(lease_id=lease.lease_id, used=False),
    }
    assert set(requests) == set(LEASE_ID_RPCS)
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stubs.rpc(rpc)(requests[rpc], metadata=as_(intruder))
    assert denied.value.code() == DENIED
    assert error_reason(denied.value) == "PERMISSION_DENIED"

    key = (await stubs.admin.GetKey(pb.GetKeyRequest(key_id="free/k1"),
                                    metadata=as_("admin"))).key
    assert key.active_leases == 1
    assert key.health == pb.KEY_HEALTH_HEALTHY  # the intruder's 401 report was not applied
    await alice.renew(lease.lease_id, ttl=30)
    done = await alice.complete(lease.lease_id, used=True)
    assert done.state == pb.LEASE_STATE_COMPLETED
    assert not done.refunded  # the intruder's used=False did not refund it


async def test_denied_admin_change_leaves_key_untouched(two_pools, raw, connect):
    """A SetKeyEnabled refused to a reader or consumer does not disable the key."""
    stubs = raw(two_pools)
    for who in ("reader", "alice", "nobody"):
        code = await status_of(stubs.admin.SetKeyEnabled(
            pb.SetKeyEnabledRequest(key_id="free/k1", enabled=False, reason="x"),
            metadata=as_(who)))
        assert code == DENIED, who
    key = (await stubs.admin.GetKey(pb.GetKeyRequest(key_id="free/k1"),
                                    metadata=as_("reader"))).key
    assert key.enabled
    assert key.health == pb.KEY_HEALTH_HEALTHY
    assert (await connect(two_pools, "alice").lease_key("free")).key_id == "free/k1"


async def test_role_must_grant_each_lease_rpc_on_own_lease(extra_broker, raw):
    """A principal granted only LeaseKey may lease but not renew, report or complete even its
    own lease."""
    stubs = raw(extra_broker)
    lease = await stubs.broker.LeaseKey(pb.LeaseKeyRequest(pool="free"), metadata=as_("dave"))
    assert lease.key_id == "free/k1"
    requests = {
        "RenewLease": pb.RenewLeaseRequest(lease_id=lease.lease_id),
        "ReportUsage": pb.ReportUsageRequest(lease_id=lease.lease_id, http_status=200),
        "Complete": pb.CompleteRequest(lease_id=lease.lease_id),
    }
    assert set(requests) == set(LEASE_ID_RPCS)
    codes = {rpc: await status_of(stubs.rpc(rpc)(request, metadata=as_("dave")))
             for rpc, request in requests.items()}
    assert codes == dict.fromkeys(LEASE_ID_RPCS, DENIED)


async def test_list_keys_without_pool_lists_only_readable_pools(extra_broker, raw):
    """ListKeys without a pool returns only keys of pools the caller may read; a reader of
    every pool sees all of them."""
    stubs = raw(extra_broker)
    erin = await stubs.admin.ListKeys(pb.ListKeysRequest(), metadata=as_("erin"))
    assert [k.key_id for k in erin.keys] == ["free/k1"]
    reader = await stubs.admin.ListKeys(pb.ListKeysRequest(), metadata=as_("reader"))
    assert [k.key_id for k in reader.keys] == ["free/k1", "paid/p1"]
    assert await status_of(stubs.admin.ListKeys(pb.ListKeysRequest(pool="paid"),
                                                metadata=as_("erin"))) == DENIED


async def test_pool_scoped_admin_cannot_reload_or_touch_other_pools(extra_broker, raw):
    """A role with every RPC on one pool may change keys of that pool only, and may not call
    ReloadKeys, which needs the "*" pool."""
    stubs = raw(extra_broker)
    md = as_("frank")
    set_free = stubs.admin.SetKeyEnabled(
        pb.SetKeyEnabledRequest(key_id="free/k1", enabled=True), metadata=md)
    set_paid = stubs.admin.SetKeyEnabled(
        pb.SetKeyEnabledRequest(key_id="paid/p1", enabled=True), metadata=md)
    assert await status_of(set_free) == OK
    assert await status_of(set_paid) == DENIED
    assert await status_of(stubs.admin.ReloadKeys(pb.ReloadKeysRequest(), metadata=md)) == DENIED
    assert await status_of(stubs.admin.ReloadKeys(pb.ReloadKeysRequest(),
                                                  metadata=as_("admin"))) == OK


async def test_permission_is_checked_before_existence(extra_broker, raw):
    """A caller not granted a pool gets PERMISSION_DENIED for unknown pools and keys there
    (nothing leaks), while a granted caller gets NOT_FOUND."""
    stubs = raw(extra_broker)

    async def lease(who: str, pool: str) -> grpc.StatusCode:
        return await status_of(stubs.broker.LeaseKey(pb.LeaseKeyRequest(pool=pool),
                                                     metadata=as_(who)))

    async def get(who: str, key_id: str) -> grpc.StatusCode:
        return await status_of(stubs.admin.GetKey(pb.GetKeyRequest(key_id=key_id),
                                                  metadata=as_(who)))

    async def list_(who: str, pool: str) -> grpc.StatusCode:
        return await status_of(stubs.admin.ListKeys(pb.ListKeysRequest(pool=pool),
                                                    metadata=as_(who)))

    assert await lease("carol", "ghost") == DENIED
    assert await lease("admin", "ghost") == NOT_FOUND
    assert await get("erin", "ghost/k9") == DENIED
    assert await get("erin", "paid/nope") == DENIED
    assert await get("erin", "free/nope") == NOT_FOUND
    assert await list_("erin", "ghost") == DENIED
    assert await list_("reader", "ghost") == NOT_FOUND


@on_shared_broker
@pytest.mark.parametrize("rpc", LEASE_ID_RPCS)
@pytest.mark.parametrize("who", ["nobody", "reader"])
async def test_lease_rpc_denied_by_default_even_for_unknown_lease(shared, who, rpc):
    """A principal granted a lease RPC on no pool at all gets PERMISSION_DENIED for it, even
    for a lease id that does not exist (deny by default, no existence oracle)."""
    requests = {
        "RenewLease": pb.RenewLeaseRequest(lease_id=UNKNOWN_LEASE),
        "ReportUsage": pb.ReportUsageRequest(lease_id=UNKNOWN_LEASE, http_status=200),
        "Complete": pb.CompleteRequest(lease_id=UNKNOWN_LEASE),
    }
    assert set(requests) == set(LEASE_ID_RPCS)
    method = shared.rpc(rpc)
    assert await status_of(method(requests[rpc], metadata=as_(who))) == DENIED
    # A principal that holds the grant learns the lease does not exist.
    assert await status_of(method(requests[rpc], metadata=as_("alice"))) == NOT_FOUND


async def test_no_policy_file_denies_everything(start_broker, put_keys, raw):
    """Without a policy file no token names a principal, so every RPC is refused."""
    put_keys("free", [("k1", "")])
    broker = await start_broker(policy_file="")
    stubs = raw(broker)
    for who in ("alice", "admin"):
        lease = await status_of(stubs.broker.LeaseKey(pb.LeaseKeyRequest(pool="free"),
                                                      metadata=as_(who)))
        listed = await status_of(stubs.admin.ListKeys(pb.ListKeysRequest(),
                                                      metadata=as_(who)))
        assert lease in (UNAUTH, DENIED)
        assert listed in (UNAUTH, DENIED)


# -- 2. UNAUTHENTICATED ----------------------------------------------------------------------

BAD_METADATA = [
    pytest.param((), id="no-metadata"),
    pytest.param(bearer("kbt_unknown_" + "z" * 30), id="unknown-token"),
    pytest.param(bearer(TOKENS["alice"] + "x"), id="valid-token-plus-one-char"),
    pytest.param(bearer(hash_token(TOKENS["alice"])), id="stored-hash-as-token"),
    pytest.param((("authorization", "Basic xyz"),), id="basic-scheme"),
    pytest.param((("authorization", f"Basic {TOKENS['alice']}"),), id="basic-with-valid-token"),
    pytest.param((("authorization", "Bearer"),), id="bearer-without-token"),
    pytest.param((("authorization", "Bearer "),), id="bearer-space-only"),
    pytest.param((("authorization", ""),), id="empty-header"),
    pytest.param((("authorization", "Bearer short"),), id="short-token"),
    pytest.param((("authorization", "Bearer " + "x" * 600),), id="600-char-token"),
    pytest.param((("authorization", TOKENS["alice"]),), id="token-without-scheme"),
    pytest.param((("authorization", f"Bearer {TOKENS['alice']} extra"),),
                 id="token-with-space"),
    pytest.param((("authorization", "Bearer kbt test token with spaces"),), id="spaces"),
    pytest.param((("authorization", 'Bearer kbt_test_alice!@#$%^&*(){}"<>;'),),
                 id="illegal-chars"),
    pytest.param((("x-api-key", TOKENS["alice"]),), id="token-in-other-header"),
]


def empty_request(rpc: str) -> Message:
    """A request of the input type the proto declares for ``rpc``, with no field set."""
    message: Message = getattr(pb, SERVICES[SERVICE_OF[rpc]].methods_by_name[rpc].input_type.name)()
    return message


@on_shared_broker
@pytest.mark.parametrize("metadata", BAD_METADATA)
async def test_bad_credentials_are_unauthenticated(shared, metadata):
    """Calls without a well-formed bearer token of a known principal fail UNAUTHENTICATED
    with ErrorInfo reason UNAUTHENTICATED, on both services."""
    calls = [shared.broker.LeaseKey(pb.LeaseKeyRequest(pool="free"), metadata=metadata),
             shared.admin.ListKeys(pb.ListKeysRequest(), metadata=metadata)]
    calls += [shared.rpc(rpc)(empty_request(rpc), metadata=metadata) for rpc in ALL_RPCS]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == UNAUTH
        assert error_reason(err.value) == "UNAUTHENTICATED"


@on_shared_broker
@pytest.mark.parametrize("rpc", ALL_RPCS)
async def test_every_rpc_requires_credentials(shared, rpc):
    """Every RPC without credentials fails UNAUTHENTICATED, before any request validation."""
    assert await status_of(shared.rpc(rpc)(empty_request(rpc))) == UNAUTH


@on_shared_broker
async def test_well_formed_token_variants_authenticate(shared):
    """The bearer scheme is case-insensitive and surrounding blanks are ignored."""
    stubs = shared
    for value in (f"bearer {TOKENS['alice']}", f"BEARER {TOKENS['alice']}",
                  f"  Bearer {TOKENS['alice']}  "):
        lease = await stubs.broker.LeaseKey(pb.LeaseKeyRequest(pool="free"),
                                            metadata=(("authorization", value),))
        assert lease.key_id == "free/k1", value


# -- 3. mTLS ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: bytes
    ca_file: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[bytes, bytes]]  # name -> (cert PEM, key PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(cn: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
           issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
           server: bool = False) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5))
               .not_valid_after(now + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer_key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, a server cert for 127.0.0.1 and client certs (one from a rogue CA)."""
    out = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("keybroker test CA", ca_key, _name("keybroker test CA"), ca_key, ca=True)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_name = _name("rogue CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue("keybroker-test", server_key, ca_cert.subject, ca_key, server=True)
    clients: dict[str, tuple[bytes, bytes]] = {}
    for label, cn, issuer, issuer_key in (
            ("known", MTLS_CN, ca_cert.subject, ca_key),
            ("stranger", "svc-stranger", ca_cert.subject, ca_key),
            ("rogue", MTLS_CN, rogue_name, rogue_key)):
        key = ec.generate_private_key(ec.SECP256R1())
        clients[label] = (_pem(_issue(cn, key, issuer, issuer_key)), _key_pem(key))
    (out / "ca.pem").write_bytes(_pem(ca_cert))
    (out / "server.pem").write_bytes(_pem(server_cert))
    (out / "server-key.pem").write_bytes(_key_pem(server_key))
    return Pki(ca=_pem(ca_cert), ca_file=out / "ca.pem", server_cert=out / "server.pem",
               server_key=out / "server-key.pem", clients=clients)


@pytest.fixture
def start_tls(tmp_path, start_broker, put_keys, pki) -> Callable[..., Awaitable[Broker]]:
    """start_tls(mtls) -> a TLS broker whose policy adds the svc-mtls principal; with mtls the
    client CA is set and client certificates are required, without it TLS is server-only."""

    async def start(mtls: bool = True) -> Broker:
        for pool, name in KEY_NAMES.items():
            put_keys(pool, [(name, "")])
        path = tmp_path / "mtls-policy.toml"
        path.write_text(POLICY + MTLS_POLICY)
        tls = TlsSettings(cert_file=str(pki.server_cert), key_file=str(pki.server_key),
                          client_ca_file=str(pki.ca_file) if mtls else "",
                          require_client_cert=mtls)
        return await start_broker(policy_file=str(path), tls=tls)

    return start


def tls_creds(pki: Pki, client: str | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca)
    cert, key = pki.clients[client]
    return grpc.ssl_channel_credentials(root_certificates=pki.ca, private_key=key,
                                        certificate_chain=cert)


def test_client_ca_without_required_client_certs_is_refused(tmp_path, pki, policy_file):
    """A client CA without require_client_cert is a configuration error (grpc would never ask
    for the certificate, so mTLS principals could not log in)."""
    from broker.config import Settings

    tls = TlsSettings(cert_file=str(pki.server_cert), key_file=str(pki.server_key),
                      client_ca_file=str(pki.ca_file), require_client_cert=False)
    with pytest.raises(InvalidArgument, match="require_client_cert"):
        Broker(Settings(listen="127.0.0.1:0", policy_file=str(policy_file), tls=tls))


async def test_client_certificate_names_principal(start_tls, pki, connect):
    """A client certificate whose CN is in the policy authenticates as that principal, with
    that principal's grants and lease ownership."""
    broker = await start_tls()
    cert, key = pki.clients["known"]
    svc = connect(broker, None, root_certificates=pki.ca, client_cert=cert, client_key=key)
    lease = await svc.lease_key("free")
    assert lease.key_id == "free/k1"
    with pytest.raises(BrokerError) as err:
        await svc.lease_key("paid")  # svc-mtls is a free-only consumer
    assert err.value.code == DENIED
    stranger_cert, stranger_key = pki.clients["stranger"]
    alice = connect(broker, "alice", root_certificates=pki.ca, client_cert=stranger_cert,
                    client_key=stranger_key)  # the bearer token names the principal
    with pytest.raises(BrokerError) as err:
        await alice.complete(lease.lease_id)  # the lease is svc-mtls's, not alice's
    assert err.value.code == DENIED
    assert (await svc.complete(lease.lease_id)).state == pb.LEASE_STATE_COMPLETED


async def test_client_certificate_with_unknown_cn_is_unauthenticated(start_tls, pki, connect):
    """A valid client certificate whose CN names no principal is UNAUTHENTICATED."""
    broker = await start_tls()
    cert, key = pki.clients["stranger"]
    client = connect(broker, None, root_certificates=pki.ca, client_cert=cert, client_key=key)
    with pytest.raises(BrokerError) as err:
        await client.lease_key("free")
    assert err.value.code == UNAUTH
    assert err.value.reason == "UNAUTHENTICATED"


async def test_certificate_from_untrusted_ca_never_authenticates(start_tls, pki, raw):
    """A client certificate with a known CN but signed by another CA does not authenticate."""
    broker = await start_tls()
    stubs = raw(broker, tls_creds(pki, "rogue"))
    code = await status_of(stubs.broker.LeaseKey(pb.LeaseKeyRequest(pool="free"), timeout=5))
    assert code != OK


async def test_bearer_token_works_over_tls(start_tls, pki, connect):
    """Over server-authenticated TLS without a client certificate, a bearer token still
    authenticates its principal."""
    broker = await start_tls(mtls=False)
    alice = connect(broker, "alice", root_certificates=pki.ca)
    lease = await alice.lease_key("paid")
    assert lease.key_id == "paid/p1"
    carol = connect(broker, "carol", root_certificates=pki.ca)
    with pytest.raises(BrokerError) as err:
        await carol.lease_key("paid")
    assert err.value.code == DENIED


async def test_required_client_cert_refuses_clients_without_one(start_tls, pki, raw):
    """With require_client_cert a client without a certificate (even with a valid token) or a
    plaintext client cannot complete an RPC; one with a certificate can."""
    broker = await start_tls()
    request = pb.LeaseKeyRequest(pool="free")
    no_cert = raw(broker, tls_creds(pki))
    assert await status_of(no_cert.broker.LeaseKey(request, metadata=as_("alice"),
                                                   timeout=5)) != OK
    plaintext = raw(broker)
    assert await status_of(plaintext.broker.LeaseKey(request, metadata=as_("alice"),
                                                     timeout=5)) != OK
    with_cert = raw(broker, tls_creds(pki, "known"))
    assert await status_of(with_cert.broker.LeaseKey(request, metadata=as_("alice"),
                                                     timeout=5)) == OK


# -- 4. policy reload without restart --------------------------------------------------------


def _bob_removed(policy: str) -> str:
    start = policy.index('[[principals]]\nname = "bob"')
    end = policy.index("[[principals]]", start + 1)
    return policy[:start] + policy[end:]


async def test_policy_reload_changes_decisions_without_restart(tmp_path, start_broker,
                                                               put_keys, connect, raw):
    """Rewriting the policy file changes grants, adds and removes principals within seconds,
    and the new grants apply to leases taken before the change."""
    for pool, name in KEY_NAMES.items():
        put_keys(pool, [(name, "")])
    path = tmp_path / "reload-policy.toml"
    path.write_text(POLICY)
    broker = await start_broker(policy_file=str(path))
    carol = connect(broker, "carol")
    old_lease = await carol.lease_key("free")
    with pytest.raises(BrokerError) as err:
        await carol.lease_key("paid")
    assert err.value.code == DENIED

    free_only = 'pools = ["free"]\n'
    assert POLICY.count(free_only) == 1  # the free_consumer role
    write_policy(path, _bob_removed(POLICY.replace(free_only, 'pools = ["paid"]\n'))
                 + EXTRA_POLICY)

    async def carol_may_lease_paid() -> bool:
        try:
            await carol.lease_key("paid")
        except BrokerError as exc:
            assert exc.code == DENIED
            return False
        return True

    await eventually(carol_may_lease_paid)
    with pytest.raises(BrokerError) as err:
        await carol.lease_key("free")
    assert err.value.code == DENIED
    with pytest.raises(BrokerError) as err:
        await carol.renew(old_lease.lease_id)  # her role no longer covers pool free
    assert err.value.code == DENIED
    with pytest.raises(BrokerError) as err:
        await connect(broker, "bob").lease_key("free")
    assert err.value.code == UNAUTH
    dave = raw(broker).broker.LeaseKey(pb.LeaseKeyRequest(pool="free"), metadata=as_("dave"))
    assert await status_of(dave) == OK
    assert (await connect(broker, "alice").lease_key("free")).key_id == "free/k1"


async def test_broken_policy_file_keeps_previous_policy(log_lines, tmp_path, start_broker,
                                                        put_keys, connect):
    """A policy rewrite that does not parse is logged and ignored: the old grants stay."""
    put_keys("free", [("k1", "")])
    path = tmp_path / "broken-policy.toml"
    path.write_text(POLICY)
    broker = await start_broker(policy_file=str(path))
    write_policy(path, "[roles.consumer\nthis is not toml")

    async def reload_failed() -> bool:
        return any(line.get("event") == "policy.reload_failed" for line in log_lines())

    await eventually(reload_failed)
    assert (await connect(broker, "alice").lease_key("free")).key_id == "free/k1"
    with pytest.raises(BrokerError) as err:
        await connect(broker, "nobody").lease_key("free")
    assert err.value.code == DENIED


# -- 5. audit --------------------------------------------------------------------------------


async def test_denials_are_audited_without_secrets(log_lines, start_broker, put_keys, connect,
                                                   raw):
    """Denied and unauthenticated calls each write an rpc.denied audit line naming principal,
    RPC and pool, and no token or key secret appears anywhere in the log."""
    secrets_ = put_keys("free", [("k1", "")])
    broker = await start_broker()
    stubs = raw(broker)
    lease = await connect(broker, "alice").lease_key("free")
    assert lease.api_key == secrets_["free/k1"]
    unknown = "kbt_unknown_" + "q" * 30
    assert await status_of(stubs.broker.LeaseKey(pb.LeaseKeyRequest(pool="free"),
                                                 metadata=as_("nobody"))) == DENIED
    assert await status_of(stubs.broker.Complete(pb.CompleteRequest(lease_id=lease.lease_id),
                                                 metadata=as_("bob"))) == DENIED
    assert await status_of(stubs.admin.ReloadKeys(pb.ReloadKeysRequest(),
                                                  metadata=as_("reader"))) == DENIED
    assert await status_of(stubs.broker.LeaseKey(pb.LeaseKeyRequest(pool="free"),
                                                 metadata=bearer(unknown))) == UNAUTH

    denied = [line for line in log_lines() if line.get("event") == "rpc.denied"]
    seen = {(line.get("principal"), line.get("rpc"), line.get("pool")) for line in denied}
    assert {("nobody", "LeaseKey", "free"), ("bob", "Complete", ""),
            ("reader", "ReloadKeys", ""), ("", "LeaseKey", "free")} <= seen
    for line in denied:
        assert line["decision"] == "denied"
        assert line["audit"] is True
        assert line["reason"]
    text = log_lines.raw.getvalue()
    for token in (*TOKENS.values(), unknown):
        assert token not in text
    assert secrets_["free/k1"] not in text


# -- 6. tokens are stored only as hashes -----------------------------------------------------


def _hash_only_policy(digest: str) -> str:
    return (PolicyBuilder().role("r", rpcs=["LeaseKey"], pools=["free"])
            .principal("svc", token_sha256=digest, roles=["r"]).to_toml())


def test_policy_with_only_token_hash_authenticates_plaintext(tmp_path):
    """A policy file holding only a token's SHA-256 authenticates the plaintext token, and
    neither the hash itself nor another token authenticates."""
    token = new_token()
    path = tmp_path / "hash-policy.toml"
    path.write_text(_hash_only_policy(hash_token(token)))
    assert token not in path.read_text()
    policy = Policy.from_file(path)
    principal = policy.by_token(token)
    assert principal.name == "svc"
    assert principal.may("LeaseKey", "free")
    assert not principal.may("LeaseKey", "paid")
    for wrong in (hash_token(token), new_token(), token[:-1]):
        with pytest.raises(Unauthenticated):
            policy.by_token(wrong)


def test_token_hash_is_case_insensitive_hex(tmp_path):
    """An upper-case hex token_sha256 is accepted and matches the token."""
    token = new_token()
    path = tmp_path / "upper.toml"
    path.write_text(_hash_only_policy(hash_token(token).upper()))
    assert Policy.from_file(path).by_token(token).name == "svc"


@pytest.mark.parametrize("digest", [
    pytest.param(TOKENS["alice"], id="plaintext-token"),
    pytest.param("a" * 63, id="63-hex"),
    pytest.param("g" * 64, id="non-hex"),
    pytest.param(hashlib.sha1(b"x").hexdigest(), id="sha1"),
])
def test_policy_rejects_token_sha256_that_is_not_a_hash(tmp_path, digest):
    """A token_sha256 that is not 64 hex digits (e.g. a pasted plaintext token) is rejected."""
    path = tmp_path / "bad.toml"
    path.write_text(_hash_only_policy(digest))
    with pytest.raises(InvalidArgument):
        Policy.from_file(path)


def test_hash_token_is_sha256_hex():
    """hash_token is the lower-case hex SHA-256 of the token's UTF-8 bytes."""
    token = TOKENS["alice"]
    assert hash_token(token) == hashlib.sha256(token.encode()).hexdigest()
    assert len(hash_token(token)) == 64
    assert hash_token(token) != hash_token(TOKENS["bob"])
    assert hash_token(token) == hash_token(token)


def test_new_tokens_are_long_unique_and_accepted():
    """new_token returns distinct, long tokens that the bearer parser accepts unchanged."""
    tokens = [new_token() for _ in range(200)]
    assert len(set(tokens)) == len(tokens)
    for token in tokens:
        assert len(token) >= 40
        assert token.startswith("kbt_")
        assert parse_bearer(f"Bearer {token}") == token


@pytest.mark.parametrize("header", ["Basic xyz", "Bearer", "Bearer short", "Bearer " + "x" * 600,
                                    "Bearer a b c d e f g h i j k l", ""])
def test_parse_bearer_rejects_malformed_headers(header):
    """parse_bearer raises Unauthenticated for a present but malformed header."""
    with pytest.raises(Unauthenticated):
        parse_bearer(header)


def test_parse_bearer_absent_header_is_none():
    """parse_bearer returns None when there is no authorization header at all."""
    assert parse_bearer(None) is None


async def test_broker_authenticates_generated_token_from_hash_only_policy(
        tmp_path, start_broker, put_keys, raw):
    """A broker whose policy holds only the hash of a new_token() lets that token lease."""
    put_keys("free", [("k1", "")])
    token = new_token()
    path = tmp_path / "generated.toml"
    path.write_text(_hash_only_policy(hash_token(token)))
    broker = await start_broker(policy_file=str(path))
    stubs = raw(broker)
    lease = await stubs.broker.LeaseKey(pb.LeaseKeyRequest(pool="free"), metadata=bearer(token))
    assert lease.key_id == "free/k1"
    assert await status_of(stubs.broker.LeaseKey(
        pb.LeaseKeyRequest(pool="free"), metadata=bearer(hash_token(token)))) == UNAUTH


@pytest.mark.parametrize("token", ["abc", "x" * 15])
def test_parse_bearer_says_a_short_token_is_too_short(token):
    """A well-formed header whose token is under 16 characters is refused as a too-short token."""
    with pytest.raises(Unauthenticated, match=r"token is \d+ characters; tokens have 16 to 512"):
        parse_bearer(f"Bearer {token}")
