"""Vault `jwt` auth for real: OpenBao's jwt method checks tokens this test signs (RS256) with a
key pair of its own, and the broker's session renews and logs in again with short-lived tokens."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hvac
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from broker.config import VaultAuth, VaultSettings, load_settings
from broker.errors import BackendUnavailable, InvalidArgument
from broker.vault import VaultAdmin, VaultKeySource, VaultSession


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclasses.dataclass
class JwtIssuer:
    """Signs JWTs the way a Kubernetes projected service-account token looks (RS256)."""

    key: rsa.RSAPrivateKey
    audience: str = "keybroker"
    issued: int = 0

    def public_pem(self) -> str:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def sign(self, lifetime: float = 600.0) -> str:
        self.issued += 1
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT"}
        claims = {"iss": "https://kubernetes.default.svc", "aud": [self.audience],
                  "sub": "system:serviceaccount:keybroker:keybroker", "iat": now, "nbf": now - 5,
                  "exp": now + int(lifetime), "jti": f"jwt-{self.issued}",
                  "kubernetes.io": {"namespace": "keybroker", "serviceaccount": {
                      "name": "keybroker", "uid": "0b1f-uid"}}}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"


@pytest.fixture
def jwt_auth(bao, vault_settings: VaultSettings, vault_admin: VaultAdmin, tmp_path: Path
             ) -> Callable[..., tuple[VaultSettings, JwtIssuer, Path]]:
    """jwt_auth(ttl, max_ttl) -> (settings of a jwt-auth session, the issuer, the JWT file): a jwt
    auth method of this test trusting a fresh key pair, its role carrying the broker policy."""
    root = hvac.Client(url=bao.addr, token=bao.root_token)
    mount = f"jwt-{uuid.uuid4().hex[:8]}"
    root.sys.enable_auth_method(method_type="jwt", path=mount)
    issuer = JwtIssuer(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    root.write(f"auth/{mount}/config", jwt_validation_pubkeys=[issuer.public_pem()],
               bound_issuer="https://kubernetes.default.svc")
    policy = f"kb-jwt-{vault_settings.key_prefix}"
    root.sys.create_or_update_policy(name=policy, policy=vault_admin.bootstrap()["policy"])
    jwt_file = tmp_path / "token"

    def make(ttl: str = "1h", max_ttl: str = "2h") -> tuple[VaultSettings, JwtIssuer, Path]:
        root.write(f"auth/{mount}/role/keybroker", role_type="jwt", user_claim="sub",
                   bound_audiences=["keybroker"], token_policies=[policy], token_ttl=ttl,
                   token_max_ttl=max_ttl, claim_mappings={"jti": "jti"})
        jwt_file.write_text(issuer.sign() + "\n")
        settings = dataclasses.replace(vault_settings, auth=VaultAuth.JWT, token="",
                                       role="keybroker", jwt_file=str(jwt_file), auth_mount=mount)
        return settings, issuer, jwt_file

    return make


def test_jwt_and_kubernetes_auth_need_a_role():
    """`auth = "jwt"` or `"kubernetes"` without vault.role is refused with the setting named; the
    JWT file defaults to the pod's service-account token."""
    for auth in ("jwt", "kubernetes"):
        with pytest.raises(InvalidArgument, match=r"vault\.role: required for"):
            load_settings(None, {"KEYBROKER_VAULT_AUTH": auth})
        settings = load_settings(None, {"KEYBROKER_VAULT_AUTH": auth,
                                        "KEYBROKER_VAULT_ROLE": "keybroker"})
        assert settings.vault.jwt_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"


async def test_jwt_login_reads_the_file_at_each_login(jwt_auth, put_keys):
    """A jwt session logs in with the JWT in its file and, after the token is revoked, logs in
    again with the JWT the file holds then (projected tokens rotate)."""
    expect = put_keys("free", [("k1", "")])
    settings, issuer, jwt_file = jwt_auth()
    session = VaultSession(settings)
    source = VaultKeySource(session)
    assert {k.key_id: k.secret.reveal() for k in await source.load()} == expect
    client = session.client()
    assert client.auth.token.lookup_self()["data"]["meta"]["jti"] == "jwt-1"
    jwt_file.write_text(issuer.sign())  # the kubelet rotated the token
    client.auth.token.revoke_self()
    assert session.maintain() < 1.0  # the revoked token is noticed: a fresh login
    assert session.client().auth.token.lookup_self()["data"]["meta"]["jti"] == "jwt-2"
    assert {k.key_id: k.secret.reveal() for k in await source.load()} == expect


def test_jwt_login_with_a_missing_or_foreign_jwt_says_why(jwt_auth, tmp_path):
    """A missing JWT file or a JWT signed by another key fails as BackendUnavailable naming the
    file or the refusal, never with the JWT in the message."""
    settings, _, _ = jwt_auth()
    missing = dataclasses.replace(settings, jwt_file=str(tmp_path / "nope"))
    with pytest.raises(BackendUnavailable, match=r"vault\.jwt_file .*nope"):
        VaultSession(missing).client()
    stranger = JwtIssuer(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    forged = stranger.sign()
    (tmp_path / "forged").write_text(forged)
    with pytest.raises(BackendUnavailable) as info:
        VaultSession(dataclasses.replace(settings, jwt_file=str(tmp_path / "forged"))).client()
    assert forged not in str(info.value) and "login" in str(info.value)


def _events(log_lines: Callable[[], list[dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    return [e for e in log_lines() if e.get("event") == name]


@pytest.mark.slow
async def test_broker_on_jwt_auth_serves_across_many_renewals_and_relogins(
        jwt_auth, put_keys, vault_admin, start_broker, connect, log_lines):
    """With 3-second tokens (8-second max TTL) and JWTs that expire and rotate, a broker keeps
    leasing and ReloadKeys keeps working across several renewals and re-logins."""
    expect = put_keys("free", [("k1", "")])
    settings, issuer, jwt_file = jwt_auth(ttl="3s", max_ttl="8s")
    jwt_file.write_text(issuer.sign(lifetime=6))
    broker = await start_broker(vault=dataclasses.replace(settings, reload_interval=0.5))
    alice, admin = connect(broker, "alice"), connect(broker, "admin")
    served, reloads, added = 0, 0, {}
    end = time.monotonic() + 19.0
    rotated = time.monotonic()
    while time.monotonic() < end:
        if time.monotonic() - rotated > 2.0:  # the kubelet refreshes the projected token
            jwt_file.write_text(issuer.sign(lifetime=6))
            rotated = time.monotonic()
        lease = await alice.lease_key("free")
        assert lease.api_key in {*expect.values(), *added.values()}
        await alice.complete(lease.lease_id, used=False)
        served += 1
        if served % 10 == 0:
            name = f"k{served}"
            added[f"free/{name}"] = f"sk-or-v1-test-{uuid.uuid4().hex}"
            vault_admin.put_key("free", name, added[f"free/{name}"])
            await admin.reload_keys()
            reloads += 1
            listed = {k.key_id for k in await admin.list_keys("free")}
            assert set(added) <= listed
        await asyncio.sleep(0.1)
    renewals = _events(log_lines, "vault.token_renewed")
    relogins = _events(log_lines, "vault.relogin")
    failures = _events(log_lines, "keys.reload_failed")
    assert len(renewals) >= 3 and len(relogins) >= 2, (len(renewals), len(relogins))
    assert not failures, failures[:1]
    assert reloads >= 5
    logins = [e for e in _events(log_lines, "vault.login") if e.get("auth") == "jwt"]
    assert len(logins) >= len(relogins) + 1


def _self_signed_pem(key: rsa.RSAPrivateKey) -> str:
    """A CA certificate for the kubernetes method's config (required; the API here is http)."""
    import datetime

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test cluster CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class TokenReviewApi:
    """The one Kubernetes API call Vault's kubernetes auth makes (TokenReview), answered for the
    service-account JWTs this test signed: a stand-in for the cluster's API server."""

    def __init__(self, issuer: JwtIssuer) -> None:
        self.issuer = issuer
        self.reviewed: list[str] = []
        self._runner: Any = None
        self.url = ""

    async def __aenter__(self) -> TokenReviewApi:
        from aiohttp import web

        async def review(request: web.Request) -> web.Response:
            body = await request.json()
            token = body["spec"]["token"]
            self.reviewed.append(token)
            claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
            status = {"authenticated": True, "audiences": claims["aud"], "user": {
                "username": claims["sub"], "uid": "0b1f-uid",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:keybroker"]}}
            return web.json_response({"apiVersion": "authentication.k8s.io/v1",
                                      "kind": "TokenReview", "status": status})

        app = web.Application()
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", review)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


async def test_kubernetes_auth_logs_in_with_the_service_account_jwt(
        bao, vault_settings, vault_admin, put_keys, tmp_path):
    """`auth = "kubernetes"` logs in through OpenBao's kubernetes method with the JWT file's
    token (reviewed by the cluster's TokenReview API), re-reading the file at each login."""
    expect = put_keys("free", [("k1", "")])
    root = hvac.Client(url=bao.addr, token=bao.root_token)
    mount = f"k8s-{uuid.uuid4().hex[:8]}"
    root.sys.enable_auth_method(method_type="kubernetes", path=mount)
    policy = f"kb-k8s-{vault_settings.key_prefix}"
    root.sys.create_or_update_policy(name=policy, policy=vault_admin.bootstrap()["policy"])
    issuer = JwtIssuer(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    async with TokenReviewApi(issuer) as api:
        root.write(f"auth/{mount}/config", kubernetes_host=api.url, disable_local_ca_jwt=True,
                   kubernetes_ca_cert=_self_signed_pem(issuer.key))
        root.write(f"auth/{mount}/role/keybroker", bound_service_account_names=["keybroker"],
                   bound_service_account_namespaces=["keybroker"], token_policies=[policy],
                   token_ttl="1h")
        jwt_file = tmp_path / "token"
        jwt_file.write_text(issuer.sign())
        settings = dataclasses.replace(vault_settings, auth=VaultAuth.KUBERNETES, token="",
                                       role="keybroker", jwt_file=str(jwt_file), auth_mount=mount)
        session = VaultSession(settings)
        source = VaultKeySource(session)
        loaded = await source.load()
        assert {k.key_id: k.secret.reveal() for k in loaded} == expect
        second = issuer.sign()
        jwt_file.write_text(second)
        await asyncio.to_thread(session.client().auth.token.revoke_self)
        assert await asyncio.to_thread(session.maintain) < 1.0
        assert api.reviewed[-1] == second
        meta = (await asyncio.to_thread(session.client().auth.token.lookup_self))["data"]["meta"]
        assert meta["service_account_name"] == "keybroker"
