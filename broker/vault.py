"""Vault / OpenBao through hvac: the key source, the login session, and operator tasks.

Layout: a key is a KV v2 secret at ``<kv_mount>/<key_prefix>/<pool>/<name>`` whose
``ciphertext`` is the provider key encrypted by Transit (``vault:vN:...``). Other
fields: ``account``, ``base_url``, ``models`` (list), ``enabled`` (bool),
``daily_limit``, ``minute_limit`` (ints, optional). Plaintext exists only in
this process's memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import requests.exceptions
import structlog

from .config import VaultAuth, VaultSettings
from .errors import BackendUnavailable, InvalidArgument, NotFound
from .models import Key, Secret
from .validate import check_name

__all__ = ["KeyRecord", "VaultAdmin", "VaultForbidden", "VaultKeySource", "VaultSession",
           "broker_policy_hcl", "lifecycle_policy_hcl", "lifecycle_prefix",
           "operator_policy_hcl"]

log = structlog.get_logger("keybroker.vault")
DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"


class VaultForbidden(BackendUnavailable):
    """Vault answered 403: a missing policy, or an expired or revoked token."""


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """hvac and requests errors -> BackendUnavailable / NotFound (the one mapping)."""
    try:
        yield
    except hvac.exceptions.InvalidPath:
        raise NotFound(f"vault: {what}: not found") from None
    except hvac.exceptions.Forbidden:
        raise VaultForbidden(f"vault: {what}: permission denied", backend="vault") from None
    except hvac.exceptions.VaultError as exc:
        raise BackendUnavailable(f"vault: {what}: {type(exc).__name__}", backend="vault") from None
    except requests.exceptions.RequestException as exc:
        raise BackendUnavailable(f"vault: {what}: {type(exc).__name__}", backend="vault") from None


def _verify(setting: str) -> bool | str:
    low = setting.strip().lower()
    if low in ("true", "1", "yes", ""):
        return True
    if low in ("false", "0", "no"):
        return False
    return setting


def _read_secret_file(path: str) -> str:
    return Path(path).read_text().strip() if path else ""


class VaultSession:
    """An authenticated hvac client that keeps its token alive.

    Token auth renews a renewable token once ``renew_fraction`` of its TTL has
    passed. AppRole auth does the same and logs in again when the token cannot be
    renewed any further (max TTL) or was revoked.
    """

    def __init__(self, settings: VaultSettings) -> None:
        self._s = settings
        self._lock = threading.Lock()
        self._client = hvac.Client(url=settings.addr, timeout=settings.timeout,
                                   verify=_verify(settings.verify))
        self._logged_in = False

    @property
    def settings(self) -> VaultSettings:
        return self._s

    def client(self) -> hvac.Client:
        with self._lock:
            if not self._logged_in:
                self._login()
            return self._client

    def _login(self) -> None:
        s = self._s
        with translate_errors("login"):
            if s.auth is VaultAuth.APPROLE:
                secret_id = s.secret_id or _read_secret_file(s.secret_id_file)
                self._client.auth.approle.login(role_id=s.role_id, secret_id=secret_id,
                                                mount_point=s.approle_mount, use_token=True)
            else:
                token = s.token or _read_secret_file(s.token_file)
                if not token:
                    raise InvalidArgument("vault.token", "no Vault token configured")
                self._client.token = token
        self._logged_in = True
        log.info("vault.login", auth=s.auth.value)

    def invalidate(self) -> None:
        """Forget the token (revoked or expired): the next call logs in afresh."""
        with self._lock:
            self._logged_in = False

    def _can_relogin(self) -> bool:
        return self._s.auth is VaultAuth.APPROLE or bool(self._s.token_file)

    def _lookup(self) -> dict[str, Any]:
        with translate_errors("token lookup"):
            return dict(self.client().auth.token.lookup_self()["data"])

    def maintain(self) -> float:
        """Renew or log in again as needed; returns seconds until it should run again.

        Vault reports ``ttl`` rounded down to whole seconds, so a token is taken as
        non-expiring only when it has no ``expire_time``; after a renewal the token is
        looked up again rather than trusting the (rounded) lease duration.
        """
        try:
            data = self._lookup()
        except BackendUnavailable:
            if not self._can_relogin():
                raise
            self.invalidate()
            self.client()
            return 0.2
        if not data.get("expire_time") or not data.get("creation_ttl"):
            return 300.0  # root or a token with no TTL: nothing to renew
        margin = float(data["creation_ttl"]) * (1.0 - self._s.renew_fraction)
        ttl = float(data.get("ttl") or 0)
        if ttl > margin:
            return max(0.2, min(ttl - margin, 300.0))
        if data.get("renewable"):
            try:
                with translate_errors("token renew"):
                    self.client().auth.token.renew_self()
                ttl = float(self._lookup().get("ttl") or 0)
                log.info("vault.token_renewed", ttl=ttl)
            except BackendUnavailable:
                ttl = 0.0
            if ttl > margin:
                return max(0.2, min(ttl - margin, 300.0))
        if self._can_relogin():  # at max TTL (or not renewable): a fresh login
            self.invalidate()
            self.client()
            log.info("vault.relogin", reason="max_ttl")
            return 0.2
        return max(0.2, ttl / 2.0)  # a static token nearing its end: keep watching


@dataclass(frozen=True)
class KeyRecord:
    """A key as stored in Vault, without its plaintext (for listings)."""

    pool: str
    name: str
    account: str
    base_url: str
    models: tuple[str, ...]
    enabled: bool
    daily_limit: int | None
    minute_limit: int | None
    version: int
    ciphertext_version: str


def _as_int(value: Any) -> int | None:
    if value in (None, ""):
        return None
    return int(value)


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in ("false", "0", "no", "off")


def _models(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    if isinstance(value, str):
        return tuple(m.strip() for m in value.split(",") if m.strip())
    return tuple(str(m) for m in value)


class _Layout:
    def __init__(self, s: VaultSettings) -> None:
        self.s = s

    def pool_dir(self, pool: str = "") -> str:
        base = self.s.key_prefix.strip("/")
        return f"{base}/{pool}" if pool else base

    def path(self, pool: str, name: str) -> str:
        return f"{self.pool_dir(pool)}/{name}"

    def list(self, client: hvac.Client, path: str) -> list[str]:
        try:
            with translate_errors(f"list {path}"):
                resp = client.secrets.kv.v2.list_secrets(path=path, mount_point=self.s.kv_mount)
        except NotFound:
            return []
        return [str(k) for k in resp["data"]["keys"]]

    def walk(self, client: hvac.Client, pool: str = "") -> Iterator[tuple[str, str, Mapping[str, Any], int]]:
        """(pool, name, fields, version) of every key, skipping malformed names."""
        pools = [pool + "/"] if pool else self.list(client, self.pool_dir())
        for entry in pools:
            if not entry.endswith("/"):
                continue
            p = entry[:-1]
            for name in self.list(client, self.pool_dir(p)):
                if name.endswith("/"):
                    continue
                try:
                    check_name("pool", p)
                    check_name("name", name)
                except InvalidArgument:
                    log.warning("vault.key_skipped", pool=p, reason="bad name")
                    continue
                try:
                    with translate_errors(f"read {p}/{name}"):
                        resp = client.secrets.kv.v2.read_secret_version(
                            path=self.path(p, name), mount_point=self.s.kv_mount,
                            raise_on_deleted_version=True)
                except NotFound:
                    continue  # removed between list and read
                yield p, name, resp["data"]["data"], int(resp["data"]["metadata"]["version"])


def _record(pool: str, name: str, data: Mapping[str, Any], version: int) -> KeyRecord:
    ciphertext = str(data.get("ciphertext", ""))
    return KeyRecord(
        pool=pool, name=name,
        account=str(data.get("account") or f"key:{pool}/{name}"),
        base_url=str(data.get("base_url") or DEFAULT_BASE_URL), models=_models(data.get("models")),
        enabled=_as_bool(data.get("enabled", True)), daily_limit=_as_int(data.get("daily_limit")),
        minute_limit=_as_int(data.get("minute_limit")), version=version,
        ciphertext_version=":".join(ciphertext.split(":")[:2]))


class VaultKeySource:
    """KeySource over KV v2 + Transit. Decrypts in one batch; caches by ciphertext."""

    def __init__(self, session: VaultSession) -> None:
        self._session = session
        self._layout = _Layout(session.settings)
        self._plain: dict[str, Secret] = {}

    async def load(self) -> list[Key]:
        try:
            return await asyncio.to_thread(self._load)
        except VaultForbidden:
            self._session.invalidate()  # an expired or revoked token: log in on the next try
            raise

    def _load(self) -> list[Key]:
        s = self._session.settings
        client = self._session.client()
        entries = []
        for pool, name, data, version in self._layout.walk(client):
            ciphertext = str(data.get("ciphertext", ""))
            if not ciphertext.startswith("vault:"):
                log.warning("vault.key_skipped", key_id=f"{pool}/{name}", reason="no ciphertext")
                continue
            try:
                entries.append((_record(pool, name, data, version), ciphertext))
            except (TypeError, ValueError):
                log.warning("vault.key_skipped", key_id=f"{pool}/{name}", reason="bad fields")
        todo = sorted({c for _, c in entries if c not in self._plain})
        if todo:
            with translate_errors("transit decrypt"):
                resp = client.secrets.transit.decrypt_data(
                    name=s.transit_key, mount_point=s.transit_mount,
                    batch_input=[{"ciphertext": c} for c in todo])
            for c, result in zip(todo, resp["data"]["batch_results"], strict=True):
                if result.get("error") or "plaintext" not in result:
                    log.warning("vault.decrypt_failed", reason="transit refused one ciphertext")
                    continue
                self._plain[c] = Secret(base64.b64decode(result["plaintext"]).decode())
        live = {c for _, c in entries}
        self._plain = {c: v for c, v in self._plain.items() if c in live}
        keys = []
        for rec, c in entries:
            secret = self._plain.get(c)
            if secret is None:
                continue
            keys.append(Key(pool=rec.pool, name=rec.name, account=rec.account, secret=secret,
                            base_url=rec.base_url, models=rec.models, enabled=rec.enabled,
                            daily_limit=rec.daily_limit, minute_limit=rec.minute_limit,
                            version=rec.version))
        return keys


def broker_policy_hcl(s: VaultSettings) -> str:
    """Least privilege for the broker: read and list keys, decrypt with one Transit key."""
    prefix = s.key_prefix.strip("/")
    return f'''# keybroker broker: read the key list, decrypt with the one Transit key.
path "{s.kv_mount}/data/{prefix}/*" {{
  capabilities = ["read"]
}}
path "{s.kv_mount}/metadata/{prefix}" {{
  capabilities = ["list"]
}}
path "{s.kv_mount}/metadata/{prefix}/*" {{
  capabilities = ["list"]
}}
path "{s.transit_mount}/decrypt/{s.transit_key}" {{
  capabilities = ["update"]
}}
'''


def operator_policy_hcl(s: VaultSettings) -> str:
    """For the people who write keys: manage the key path, encrypt and rewrap, never decrypt."""
    prefix = s.key_prefix.strip("/")
    return f'''# keybroker operators: manage keys, encrypt and rewrap; no decrypt.
path "{s.kv_mount}/data/{prefix}/*" {{
  capabilities = ["create", "read", "update", "patch", "delete"]
}}
path "{s.kv_mount}/metadata/{prefix}" {{
  capabilities = ["list"]
}}
path "{s.kv_mount}/metadata/{prefix}/*" {{
  capabilities = ["list", "read", "delete"]
}}
path "{s.transit_mount}/encrypt/{s.transit_key}" {{
  capabilities = ["update"]
}}
path "{s.transit_mount}/rewrap/{s.transit_key}" {{
  capabilities = ["update"]
}}
'''


def lifecycle_prefix(s: VaultSettings) -> str:
    """Path under the KV mount of management keys and rotation records."""
    return f"{s.key_prefix.strip('/')}-lifecycle"


def lifecycle_policy_hcl(s: VaultSettings) -> str:
    """For whoever provisions, rotates and revokes keys through the provider's management API
    (the broker, when it runs rotations, adds this to its policy): write keys, encrypt, read
    the per-account management keys and keep rotation records."""
    prefix, life = s.key_prefix.strip("/"), lifecycle_prefix(s)
    return f'''# keybroker key lifecycle: write keys, encrypt, management keys, rotation records.
path "{s.kv_mount}/data/{prefix}/*" {{
  capabilities = ["create", "read", "update", "patch", "delete"]
}}
path "{s.kv_mount}/metadata/{prefix}/*" {{
  capabilities = ["list", "read", "delete"]
}}
path "{s.kv_mount}/data/{life}/*" {{
  capabilities = ["create", "read", "update", "patch", "delete"]
}}
path "{s.kv_mount}/metadata/{life}/*" {{
  capabilities = ["list", "read", "delete"]
}}
path "{s.transit_mount}/encrypt/{s.transit_key}" {{
  capabilities = ["update"]
}}
'''


class VaultAdmin:
    """Operator tasks behind the ``keybroker vault`` and ``keybroker keys`` commands."""

    BROKER_POLICY = "keybroker-broker"
    OPERATOR_POLICY = "keybroker-operator"
    LIFECYCLE_POLICY = "keybroker-lifecycle"
    """Written by ``bootstrap``, attached to nothing: add it to the broker's token (or role)
    to let the broker provision, rotate and revoke keys."""
    ROLE = "keybroker"

    def __init__(self, session: VaultSession) -> None:
        self._session = session
        self._s = session.settings
        self._layout = _Layout(self._s)

    def bootstrap(self) -> dict[str, str]:
        """Idempotently create the Transit key, KV v2 mount, policies and AppRole role.

        Returns the applied broker policy HCL and the AppRole role_id.
        """
        c, s = self._session.client(), self._s
        with translate_errors("bootstrap"):
            mounts = c.sys.list_mounted_secrets_engines()
            mounts = mounts.get("data", mounts)
            if f"{s.transit_mount}/" not in mounts:
                c.sys.enable_secrets_engine(backend_type="transit", path=s.transit_mount)
            if f"{s.kv_mount}/" not in mounts:
                c.sys.enable_secrets_engine(backend_type="kv", path=s.kv_mount,
                                            options={"version": "2"})
            try:
                c.secrets.transit.read_key(name=s.transit_key, mount_point=s.transit_mount)
            except hvac.exceptions.InvalidPath:
                c.secrets.transit.create_key(name=s.transit_key, key_type="aes256-gcm96",
                                             mount_point=s.transit_mount)
            broker_hcl = broker_policy_hcl(s)
            c.sys.create_or_update_policy(name=self.BROKER_POLICY, policy=broker_hcl)
            c.sys.create_or_update_policy(name=self.OPERATOR_POLICY,
                                          policy=operator_policy_hcl(s))
            c.sys.create_or_update_policy(name=self.LIFECYCLE_POLICY,
                                          policy=lifecycle_policy_hcl(s))
            auths = c.sys.list_auth_methods()
            auths = auths.get("data", auths)
            if f"{s.approle_mount}/" not in auths:
                c.sys.enable_auth_method(method_type="approle", path=s.approle_mount)
            c.auth.approle.create_or_update_approle(
                role_name=self.ROLE, token_policies=[self.BROKER_POLICY], token_ttl="1h",
                token_max_ttl="24h", mount_point=s.approle_mount)
            role_id = c.auth.approle.read_role_id(role_name=self.ROLE,
                                                  mount_point=s.approle_mount)["data"]["role_id"]
        return {"policy": broker_hcl, "role_id": str(role_id)}

    def new_secret_id(self) -> str:
        with translate_errors("generate secret_id"):
            resp = self._session.client().auth.approle.generate_secret_id(
                role_name=self.ROLE, mount_point=self._s.approle_mount)
        return str(resp["data"]["secret_id"])

    def put_key(self, pool: str, name: str, secret: str, *, account: str = "",
                base_url: str = "", models: tuple[str, ...] = (), enabled: bool = True,
                daily_limit: int | None = None, minute_limit: int | None = None) -> int:
        """Encrypt ``secret`` through Transit and write the key; returns the KV version."""
        check_name("pool", pool)
        check_name("name", name)
        if account:
            check_name("account", account)
        if not secret or any(ch.isspace() for ch in secret):
            raise InvalidArgument("secret", "must be non-empty without whitespace")
        c = self._session.client()
        with translate_errors("transit encrypt"):
            ciphertext = c.secrets.transit.encrypt_data(
                name=self._s.transit_key, mount_point=self._s.transit_mount,
                plaintext=base64.b64encode(secret.encode()).decode())["data"]["ciphertext"]
        fields: dict[str, Any] = {"ciphertext": ciphertext, "enabled": enabled,
                                  "models": list(models)}
        if account:
            fields["account"] = account
        if base_url:
            fields["base_url"] = base_url
        if daily_limit is not None:
            fields["daily_limit"] = daily_limit
        if minute_limit is not None:
            fields["minute_limit"] = minute_limit
        with translate_errors(f"write {pool}/{name}"):
            resp = c.secrets.kv.v2.create_or_update_secret(
                path=self._layout.path(pool, name), secret=fields, mount_point=self._s.kv_mount)
        return int(resp["data"]["version"])

    def list_keys(self, pool: str = "") -> list[KeyRecord]:
        if pool:
            check_name("pool", pool)
        return [_record(p, n, d, v) for p, n, d, v in self._layout.walk(self._session.client(),
                                                                         pool)]

    def set_enabled(self, pool: str, name: str, enabled: bool) -> None:
        self._update(pool, name, {"enabled": enabled})

    def remove_key(self, pool: str, name: str) -> None:
        self._existing(pool, name)
        with translate_errors(f"delete {pool}/{name}"):
            self._session.client().secrets.kv.v2.delete_metadata_and_all_versions(
                path=self._layout.path(pool, name), mount_point=self._s.kv_mount)

    def rewrap(self) -> int:
        """Re-encrypt under the latest Transit key version every key not already on it."""
        c, s, count = self._session.client(), self._s, 0
        with translate_errors("transit read key"):
            latest = int(c.secrets.transit.read_key(
                name=s.transit_key, mount_point=s.transit_mount)["data"]["latest_version"])
        for pool, name, data, _ in list(self._layout.walk(c)):
            ciphertext = str(data.get("ciphertext", ""))
            if not ciphertext.startswith("vault:v") or ciphertext.split(":")[1] == f"v{latest}":
                continue
            with translate_errors(f"rewrap {pool}/{name}"):
                new = c.secrets.transit.rewrap_data(name=s.transit_key, ciphertext=ciphertext,
                                                    mount_point=s.transit_mount)["data"]
            self._update(pool, name, {"ciphertext": new["ciphertext"]})
            count += 1
        return count

    def _update(self, pool: str, name: str, changes: Mapping[str, Any]) -> None:
        """Read-modify-write one key with check-and-set, so a concurrent write is not lost."""
        check_name("pool", pool)
        check_name("name", name)
        c, path = self._session.client(), self._layout.path(pool, name)
        with translate_errors(f"update {pool}/{name}"):
            current = c.secrets.kv.v2.read_secret_version(
                path=path, mount_point=self._s.kv_mount, raise_on_deleted_version=True)["data"]
            c.secrets.kv.v2.create_or_update_secret(
                path=path, secret={**current["data"], **changes}, mount_point=self._s.kv_mount,
                cas=int(current["metadata"]["version"]))

    def _existing(self, pool: str, name: str) -> None:
        check_name("pool", pool)
        check_name("name", name)
        with translate_errors(f"read {pool}/{name}"):
            self._session.client().secrets.kv.v2.read_secret_metadata(
                path=self._layout.path(pool, name), mount_point=self._s.kv_mount)

    # -- key lifecycle (provision, rotate, revoke through the provider's management API) ----
    #
    # Management keys live at <kv_mount>/<key_prefix>-lifecycle/management/<account> (a
    # field ``secret``; never leased, never returned, never logged); rotation records at
    # <kv_mount>/<key_prefix>-lifecycle/rotations/<pool>/<name>, with check-and-set so two
    # writers never both start or advance one rotation. Beside the key prefix, not under
    # it: the key walk must not take them for pools.

    def _life(self, *parts: str) -> str:
        return "/".join([lifecycle_prefix(self._s), *parts])

    def put_management_key(self, account: str, secret: str) -> None:
        """Store the provider management key of ``account`` (its own path, not a pool key)."""
        check_name("account", account)
        if not secret or any(ch.isspace() for ch in secret):
            raise InvalidArgument("secret", "must be non-empty without whitespace")
        with translate_errors(f"write management key of {account}"):
            self._session.client().secrets.kv.v2.create_or_update_secret(
                path=self._life("management", account), secret={"secret": secret},
                mount_point=self._s.kv_mount)

    def management_key(self, account: str) -> Secret:
        """The management key of ``account``; NotFound when none is stored."""
        check_name("account", account)
        with translate_errors(f"management key of {account}"):
            resp = self._session.client().secrets.kv.v2.read_secret_version(
                path=self._life("management", account), mount_point=self._s.kv_mount,
                raise_on_deleted_version=True)
        return Secret(str(resp["data"]["data"].get("secret", "")))

    def put_managed_key(self, pool: str, name: str, secret: str, *, account: str,
                        base_url: str, models: tuple[str, ...] = (),
                        daily_limit: int | None = None, minute_limit: int | None = None,
                        lifecycle: Mapping[str, Any]) -> int:
        """``put_key`` plus the provider-side facts (``provider_hash``, ``created_at``,
        ``expires_at``, ...) rotation needs; returns the KV version."""
        self.put_key(pool, name, secret, account=account, base_url=base_url, models=models,
                     daily_limit=daily_limit, minute_limit=minute_limit)
        self._update(pool, name, dict(lifecycle))
        return int(self.key_fields(pool, name)["_version"])

    def key_fields(self, pool: str, name: str) -> dict[str, Any]:
        """One key's stored fields without its ciphertext (plus ``_version``); NotFound."""
        check_name("pool", pool)
        check_name("name", name)
        with translate_errors(f"read {pool}/{name}"):
            resp = self._session.client().secrets.kv.v2.read_secret_version(
                path=self._layout.path(pool, name), mount_point=self._s.kv_mount,
                raise_on_deleted_version=True)
        data = {k: v for k, v in resp["data"]["data"].items() if k != "ciphertext"}
        return data | {"_version": int(resp["data"]["metadata"]["version"])}

    def all_key_fields(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(pool, name, fields without ciphertext) of every key."""
        return [(p, n, {k: v for k, v in d.items() if k != "ciphertext"})
                for p, n, d, _ in self._layout.walk(self._session.client())]

    def rotation_records(self) -> list[dict[str, Any]]:
        """Every unfinished rotation's record (each with its ``_version``)."""
        c, out = self._session.client(), []
        for pool in self._layout.list(c, self._life("rotations")):
            if not pool.endswith("/"):
                continue
            for name in self._layout.list(c, self._life("rotations", pool[:-1])):
                try:
                    out.append(self.rotation_record(pool[:-1], name))
                except NotFound:
                    continue
        return out

    def rotation_record(self, pool: str, name: str) -> dict[str, Any]:
        check_name("pool", pool)
        check_name("name", name)
        with translate_errors(f"rotation record {pool}/{name}"):
            resp = self._session.client().secrets.kv.v2.read_secret_version(
                path=self._life("rotations", pool, name), mount_point=self._s.kv_mount,
                raise_on_deleted_version=True)
        return dict(resp["data"]["data"]) | {"_version": int(resp["data"]["metadata"]["version"])}

    def save_rotation(self, pool: str, name: str, record: Mapping[str, Any], cas: int) -> int:
        """Write a rotation record if its version is still ``cas`` (0: only if none exists);
        returns the new version, or 0 when another writer got there first."""
        check_name("pool", pool)
        check_name("name", name)
        fields = {k: v for k, v in record.items() if k != "_version"}
        try:
            with translate_errors(f"save rotation {pool}/{name}"):
                resp = self._session.client().secrets.kv.v2.create_or_update_secret(
                    path=self._life("rotations", pool, name), secret=fields,
                    mount_point=self._s.kv_mount, cas=cas)
        except BackendUnavailable as exc:
            if "InvalidRequest" in exc.message:  # check-and-set lost
                return 0
            raise
        return int(resp["data"]["version"])

    def end_rotation(self, pool: str, name: str) -> None:
        """Forget a finished (or rolled back) rotation's record."""
        check_name("pool", pool)
        check_name("name", name)
        with contextlib.suppress(NotFound), translate_errors(f"end rotation {pool}/{name}"):
            self._session.client().secrets.kv.v2.delete_metadata_and_all_versions(
                path=self._life("rotations", pool, name), mount_point=self._s.kv_mount)
