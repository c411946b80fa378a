"""Provider key lifecycle: provision, rotate and revoke keys through the provider's
management API, with Vault the only place their secrets live.

A rotation is a small state machine whose record lives in Vault next to the keys
(``VaultAdmin.save_rotation``, check-and-set), so a run killed at any step is resumed by
the next one (``resume_all``; the broker's rotation loop calls it):

``creating``  create the replacement at the provider (under a name that says which key it
              replaces) and store it in Vault. A provider key of that name that is not in
              Vault was left by a killed run: its secret is lost, so it is deleted first.
``stored``    reload the broker's keys (the replacement serves) and stop new leases on the
              old key (disabled in the shared health record, on every replica).
``draining``  wait until the old key's active leases complete or expire, at most
              ``rotation.drain_timeout`` (default: ``lease.max_ttl``).
``deleting``  delete the old key at the provider (already gone is fine), remove it from
              Vault, reload, forget the record.

Each step is an audit record (``key.rotation_step``) and a span; a failed attempt is
``key.rotation_failed`` (and an alert) and leaves the record for the next run. The secret
goes from the provider's answer straight into Vault and is held only as a ``Secret``.

I/O sits behind three small Protocols: ``ProviderKeys`` (the management API),
``KeyVault`` (``VaultAdmin``) and ``BrokerSide`` (the lease engine and its store).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
import structlog
from opentelemetry.trace import Tracer, get_current_span

from .audit import Audit, AuditEvent
from .clock import Clock
from .config import Settings, normalize_base_url
from .errors import BackendUnavailable, BrokerError, InvalidArgument, NotFound
from .models import Secret
from .rpcs import Rpc
from .validate import check_key_id, check_name, check_text

__all__ = ["BrokerSide", "KeyLifecycle", "KeyVault", "OpenRouterKeys", "ProviderKey",
           "ProviderKeys", "Revocation", "RotationResult"]

log = structlog.get_logger("keybroker.lifecycle")
STEPS = ("creating", "stored", "draining", "deleting")


@dataclass(frozen=True)
class ProviderKey:
    """A key as the management API shows it: its hash (public id), never its secret."""

    hash: str
    name: str
    disabled: bool = False
    expires_at: float | None = None


class ProviderKeys(Protocol):
    """The provider's key-management API, authenticated by an account's management key."""

    async def create(self, base_url: str, manager: Secret, *, name: str,
                     limit: float | None = None, limit_reset: str | None = None,
                     expires_at: float | None = None) -> tuple[ProviderKey, Secret]: ...

    async def list(self, base_url: str, manager: Secret) -> list[ProviderKey]: ...

    async def delete(self, base_url: str, manager: Secret, key_hash: str) -> bool:
        """Delete a key; False when it was already gone."""
        ...


class KeyVault(Protocol):
    """What the lifecycle needs of Vault (``broker.vault.VaultAdmin``; blocking calls)."""

    def management_key(self, account: str) -> Secret: ...

    def put_managed_key(self, pool: str, name: str, secret: str, *, account: str,
                        base_url: str, models: tuple[str, ...] = (),
                        daily_limit: int | None = None, minute_limit: int | None = None,
                        lifecycle: Mapping[str, Any]) -> int: ...

    def remove_key(self, pool: str, name: str) -> None: ...

    def key_fields(self, pool: str, name: str) -> dict[str, Any]: ...

    def all_key_fields(self) -> list[tuple[str, str, dict[str, Any]]]: ...

    def rotation_records(self) -> list[dict[str, Any]]: ...

    def rotation_record(self, pool: str, name: str) -> dict[str, Any]: ...

    def save_rotation(self, pool: str, name: str, record: Mapping[str, Any],
                      cas: int) -> int: ...

    def end_rotation(self, pool: str, name: str) -> None: ...


class BrokerSide(Protocol):
    """The lease engine's side of a rotation."""

    async def stop_leasing(self, key_id: str, reason: str) -> None:
        """No new lease on this key, on any replica (the shared health record)."""
        ...

    async def end_leases(self, key_id: str, account: str) -> int:
        """End the key's active leases (they cannot be renewed, their units stay spent;
        reports and Complete on them are still accepted); how many were ended."""
        ...

    async def active_leases(self, key_id: str) -> int: ...

    async def reload(self) -> None:
        """Re-read the keys from Vault now."""
        ...


class Caller(Protocol):
    @property
    def principal(self) -> str: ...

    def require(self, rpc: Rpc, pool: str) -> None: ...


@dataclass(frozen=True)
class RotationResult:
    """What a rotation did: the old and the new key id, and the step it reached."""

    old_key_id: str
    new_key_id: str
    step: str
    done: bool


@dataclass(frozen=True)
class Revocation:
    """What a revocation did: whether the provider deleted the key (False: a key put by
    hand, no provider hash) and how many active leases on it were ended."""

    provider_deleted: bool
    leases_ended: int


def provider_name(pool: str, name: str) -> str:
    """The name a managed key carries at the provider: which broker key it is."""
    return f"keybroker:{pool}/{name}"


def _new_name(old: str) -> str:
    """A replacement's name: the old stem and a fresh suffix (never a name seen before, so
    no stale health record or counter applies to it)."""
    stem, _, tail = old.rpartition("-")
    if not (stem and len(tail) == 6 and all(c in "0123456789abcdef" for c in tail)):
        stem = old
    return f"{stem[:56]}-{secrets.token_hex(3)}"


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: Any) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()


class OpenRouterKeys:
    """``ProviderKeys`` over OpenRouter's ``/api/v1/keys`` with httpx. Errors: 404 -> NotFound,
    any other failure -> BackendUnavailable (backend ``provider``); no message carries a
    secret (the answer's body is never echoed)."""

    def __init__(self, timeout: float = 10.0) -> None:
        self._timeout = timeout

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"provider: {what}: {type(exc).__name__}",
                                     backend="provider") from None

    async def _call(self, method: str, url: str, manager: Secret, what: str,
                    body: Mapping[str, Any] | None = None) -> httpx.Response:
        with self._translate(what):
            async with httpx.AsyncClient(timeout=self._timeout) as http:
                resp = await http.request(method, url, json=body, headers={
                    "Authorization": f"Bearer {manager.reveal()}"})
        if resp.status_code == 404:
            raise NotFound(f"provider: {what}: not found")
        if resp.status_code >= 300:
            raise BackendUnavailable(f"provider: {what}: HTTP {resp.status_code}",
                                     backend="provider")
        return resp

    @staticmethod
    def _key(data: Mapping[str, Any]) -> ProviderKey:
        return ProviderKey(hash=str(data["hash"]), name=str(data.get("name") or ""),
                           disabled=bool(data.get("disabled")),
                           expires_at=_parse_iso(data.get("expires_at")))

    async def create(self, base_url: str, manager: Secret, *, name: str,
                     limit: float | None = None, limit_reset: str | None = None,
                     expires_at: float | None = None) -> tuple[ProviderKey, Secret]:
        body: dict[str, Any] = {"name": name}
        if limit is not None:
            body["limit"] = limit
        if limit_reset:
            body["limit_reset"] = limit_reset
        if expires_at is not None:
            body["expires_at"] = _iso(expires_at)
        resp = await self._call("POST", f"{base_url.rstrip('/')}/keys", manager,
                                "create key", body)
        data = resp.json()
        return self._key(data["data"]), Secret(str(data["key"]))

    async def list(self, base_url: str, manager: Secret) -> list[ProviderKey]:
        out: list[ProviderKey] = []
        while True:
            resp = await self._call("GET", f"{base_url.rstrip('/')}/keys?offset={len(out)}"
                                           "&include_disabled=true", manager, "list keys")
            page = resp.json().get("data") or []
            out += [self._key(k) for k in page]
            if len(page) < 100:
                return out

    async def delete(self, base_url: str, manager: Secret, key_hash: str) -> bool:
        try:
            await self._call("DELETE", f"{base_url.rstrip('/')}/keys/{key_hash}", manager,
                             "delete key")
        except NotFound:
            return False
        return True


class KeyLifecycle:
    """Provision, rotate (by hand or by schedule) and revoke provider keys.

    Args:
        settings: the broker's settings (``rotation`` section, pools' max ages, lease TTL).
        vault: Vault operations (``VaultAdmin``).
        provider: the management API (``OpenRouterKeys``).
        broker: the lease engine's side (stop leasing, active leases, reload).
        owner: this process's name in rotation claims (two runs never advance one
            rotation at once; a dead owner's claim lapses after ``rotation.claim_seconds``).
    """

    def __init__(self, settings: Settings, clock: Clock, audit: Audit, *, vault: KeyVault,
                 provider: ProviderKeys, broker: BrokerSide, tracer: Tracer | None = None,
                 owner: str = "") -> None:
        self._s = settings
        self._r = settings.rotation
        # The management key goes only to provider hosts the broker's configuration allows:
        # never to a URL from a request or from Vault data alone.
        self._allowed = frozenset(normalize_base_url(u) for u in (
            *settings.openrouter.allowed_base_urls, settings.rotation.management_base_url))
        self._clock = clock
        self._audit = audit
        self._vault = vault
        self._provider = provider
        self._broker = broker
        self._tracer = tracer
        self._owner = owner or f"kb-{secrets.token_hex(6)}"
        self._lock = asyncio.Lock()
        self._dates: dict[str, tuple[float | None, float | None]] = {}

    def schedule_of(self, key_id: str) -> tuple[float | None, float | None]:
        """(created at the provider, next scheduled rotation) of a managed key, as of the
        last ``refresh_dates``; (None, None) for keys put in Vault by hand."""
        return self._dates.get(key_id, (None, None))

    async def refresh_dates(self) -> None:
        """Re-read every key's creation and expiry from Vault (for ``schedule_of``)."""
        dates = {}
        for pool, name, fields in await self._v(self._vault.all_key_fields):
            if fields.get("provider_hash"):
                created = _as_float(fields.get("created_at"))
                dates[f"{pool}/{name}"] = (created, self.next_rotation(
                    pool, created, _as_float(fields.get("expires_at"))))
        self._dates = dates

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh_dates()
        except BrokerError as exc:
            log.warning("key.dates_refresh_failed", error=exc.message)

    # -- helpers -----------------------------------------------------------------------------

    async def _v(self, fn: Any, *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kw)

    @contextlib.contextmanager
    def _span(self, name: str, **attrs: str) -> Iterator[None]:
        if self._tracer is None:
            yield
            return
        with self._tracer.start_as_current_span(name, attributes=attrs):
            yield

    def _max_age_days(self, pool: str) -> float:
        own = self._s.pool(pool).rotation_max_age_days
        return own if own is not None else self._r.max_age_days

    def next_rotation(self, pool: str, created_at: float | None,
                      expires_at: float | None) -> float | None:
        """When the schedule rotates a managed key (None: never)."""
        due: list[float] = []
        age = self._max_age_days(pool)
        if age > 0 and created_at is not None:
            due.append(created_at + age * 86400.0)
        if expires_at is not None:
            due.append(expires_at - self._r.expiry_margin_days * 86400.0)
        return min(due) if due else None

    def _allowed_url(self, base_url: str) -> str:
        """``base_url`` when the management key may be sent there, else InvalidArgument."""
        if normalize_base_url(base_url) not in self._allowed:
            raise InvalidArgument("base_url", f"{base_url!r} is not in openrouter.allowed_base_urls "
                                              "(nor rotation.management_base_url): the management "
                                              "key is sent only to configured provider hosts")
        return base_url

    # -- provision ---------------------------------------------------------------------------

    async def provision(self, caller: Caller, *, account: str, pool: str, count: int = 1,
                        limit: float | None = None, limit_reset: str | None = None,
                        expires_in: float | None = None, base_url: str = "",
                        models: Sequence[str] = ()) -> list[str]:
        """Create ``count`` keys at the provider for ``account`` and store them in Vault
        under ``pool``; returns their key ids."""
        check_name("account", account)
        check_name("pool", pool)
        if not 1 <= count <= 100:
            raise InvalidArgument("count", "must be 1 to 100")
        if limit is not None and limit < 0:
            raise InvalidArgument("limit", "must be >= 0")
        if limit_reset not in (None, "", "daily", "weekly", "monthly"):
            raise InvalidArgument("limit_reset", "must be daily, weekly or monthly")
        if expires_in is not None and expires_in <= 0:
            raise InvalidArgument("expires", "must be > 0")
        caller.require(Rpc.PROVISION_KEYS, pool)
        base = self._allowed_url(base_url or self._r.management_base_url)
        manager = await self._v(self._vault.management_key, account)
        made = []
        for _ in range(count):
            name = _new_name(account)
            key_id = f"{pool}/{name}"
            with self._span("key.provision", key_id=key_id, account=account):
                await self._create_and_store(
                    pool, name, manager, account=account, base_url=base, models=tuple(models),
                    limit=limit, limit_reset=limit_reset or None, expires_in=expires_in,
                    daily_limit=None, minute_limit=None)
            self._audit.record(AuditEvent.KEY_PROVISIONED, decision="provisioned",
                               principal=caller.principal, rpc=Rpc.PROVISION_KEYS, pool=pool,
                               key_id=key_id, account=account)
            made.append(key_id)
        await self._broker.reload()
        await self._refresh_quietly()
        return made

    async def _create_and_store(self, pool: str, name: str, manager: Secret, *, account: str,
                                base_url: str, models: tuple[str, ...], limit: float | None,
                                limit_reset: str | None, expires_in: float | None,
                                daily_limit: int | None, minute_limit: int | None) -> str:
        """Create one key at the provider and put it in Vault; if Vault refuses, delete it at
        the provider again (a key must not live at the provider outside Vault)."""
        now = self._clock.now()
        expires_at = now + expires_in if expires_in else None
        key, secret = await self._provider.create(
            base_url, manager, name=provider_name(pool, name), limit=limit,
            limit_reset=limit_reset, expires_at=expires_at)
        fields: dict[str, Any] = {"provider_hash": key.hash, "created_at": now,
                                  "managed": True}
        if expires_at is not None:
            fields |= {"expires_at": expires_at, "expires_in": expires_in}
        if limit is not None:
            fields["credit_limit"] = limit
        if limit_reset:
            fields["limit_reset"] = limit_reset
        try:
            await self._v(self._vault.put_managed_key, pool, name, secret.reveal(),
                          account=account, base_url=base_url, models=models,
                          daily_limit=daily_limit, minute_limit=minute_limit, lifecycle=fields)
        except BrokerError:
            with contextlib.suppress(BrokerError):
                await self._provider.delete(base_url, manager, key.hash)
            raise
        return key.hash

    # -- rotate ------------------------------------------------------------------------------

    async def rotate(self, caller: Caller, key_id: str, reason: str = "operator",
                     rpc: str = Rpc.ROTATE_KEY) -> RotationResult:
        """Replace ``key_id`` by a new provider key, drain and delete the old one; resumes a
        rotation of it already under way."""
        pool, name = check_key_id(key_id)
        check_text("reason", reason, 256)
        caller.require(Rpc.ROTATE_KEY, pool)
        fields = await self._v(self._vault.key_fields, pool, name)
        if not fields.get("provider_hash"):
            raise InvalidArgument("key_id", f"{key_id} was not provisioned through the "
                                            "provider's management API (no provider_hash); "
                                            "put its replacement by hand")
        try:
            record = await self._v(self._vault.rotation_record, pool, name)
        except NotFound:
            record = {"pool": pool, "name": name, "new_name": _new_name(name),
                      "account": str(fields.get("account") or ""), "step": "creating",
                      "old_hash": str(fields["provider_hash"]), "started_at": self._clock.now(),
                      "reason": reason, "principal": caller.principal, "_version": 0}
        return await self._advance(record, caller.principal, rpc)

    async def resume_all(self) -> list[RotationResult]:
        """Carry every unfinished rotation (a killed or failed run's) forward."""
        out = []
        for record in await self._v(self._vault.rotation_records):
            with contextlib.suppress(BrokerError):  # audited and alerted by _advance
                out.append(await self._advance(record, "keybroker", "schedule"))
        return out

    async def run_schedule(self) -> list[RotationResult]:
        """Resume unfinished rotations, then rotate managed keys that are too old or close
        to their ``expires_at``. Failures are audited (and alerted), never raised."""
        out = await self.resume_all()
        now = self._clock.now()
        for pool, name, fields in await self._v(self._vault.all_key_fields):
            if not fields.get("provider_hash"):
                continue
            due = self.next_rotation(pool, _as_float(fields.get("created_at")),
                                     _as_float(fields.get("expires_at")))
            if due is None or due > now:
                continue
            record = {"pool": pool, "name": name, "new_name": _new_name(name),
                      "account": str(fields.get("account") or ""), "step": "creating",
                      "old_hash": str(fields["provider_hash"]), "started_at": now,
                      "reason": "schedule", "principal": "keybroker", "_version": 0}
            with contextlib.suppress(BrokerError):
                out.append(await self._advance(record, "keybroker", "schedule"))
        await self._refresh_quietly()
        return out

    async def _claim(self, record: dict[str, Any]) -> dict[str, Any]:
        """Take (or renew) the rotation's claim with check-and-set; BackendUnavailable when
        another live run holds it or got there first."""
        now = self._clock.now()
        owner, until = record.get("owner"), float(record.get("claimed_until") or 0)
        if owner and owner != self._owner and until > time.time():
            raise BackendUnavailable(f"rotation of {record['pool']}/{record['name']} is under "
                                     f"way elsewhere ({owner})", backend="vault")
        claimed = {**record, "owner": self._owner,
                   "claimed_until": time.time() + self._r.claim_seconds, "updated_at": now}
        version = await self._v(self._vault.save_rotation, record["pool"], record["name"],
                                claimed, int(record.get("_version") or 0))
        if not version:
            raise BackendUnavailable(f"rotation of {record['pool']}/{record['name']} changed "
                                     "under this run", backend="vault")
        return claimed | {"_version": version}

    async def _save(self, record: dict[str, Any], step: str, **changes: Any) -> dict[str, Any]:
        record = {**record, **changes, "step": step,
                  "claimed_until": time.time() + self._r.claim_seconds}
        version = await self._v(self._vault.save_rotation, record["pool"], record["name"],
                                record, int(record["_version"]))
        if not version:
            raise BackendUnavailable(f"rotation of {record['pool']}/{record['name']} changed "
                                     "under this run", backend="vault")
        return record | {"_version": version}

    def _step_audit(self, record: Mapping[str, Any], principal: str, rpc: str,
                    step: str) -> None:
        self._audit.record(AuditEvent.KEY_ROTATION_STEP, decision=step, principal=principal,
                           rpc=rpc, pool=str(record["pool"]),
                           key_id=f"{record['pool']}/{record['name']}",
                           new_key_id=f"{record['pool']}/{record['new_name']}",
                           reason=str(record.get("reason") or ""))

    async def _advance(self, record: dict[str, Any], principal: str,
                       rpc: str) -> RotationResult:
        pool, name, new_name = record["pool"], record["name"], record["new_name"]
        old_id, new_id = f"{pool}/{name}", f"{pool}/{new_name}"
        async with self._lock:
            try:
                with self._span("key.rotate", key_id=old_id, new_key_id=new_id):
                    record = await self._claim(record)
                    record = await self._run_steps(record, principal, rpc)
            except BrokerError as exc:
                self._audit.record(AuditEvent.KEY_ROTATION_FAILED, decision="failed",
                                   principal=principal, rpc=rpc, pool=pool, key_id=old_id,
                                   new_key_id=new_id, step=str(record.get("step")),
                                   reason=exc.message)
                log.warning("key.rotation_failed", key_id=old_id, step=record.get("step"),
                            error=exc.message)
                raise
        self._audit.record(AuditEvent.KEY_ROTATED, decision="rotated", principal=principal,
                           rpc=rpc, pool=pool, key_id=old_id, new_key_id=new_id,
                           reason=str(record.get("reason") or ""))
        await self._refresh_quietly()
        return RotationResult(old_id, new_id, "done", True)

    async def _run_steps(self, record: dict[str, Any], principal: str,
                         rpc: str) -> dict[str, Any]:
        pool, name, new_name = record["pool"], record["name"], record["new_name"]
        old_id = f"{pool}/{name}"
        if record["step"] == "creating":
            with self._span("key.rotation.create", key_id=old_id):
                record = await self._create_replacement(record)
            self._step_audit(record, principal, rpc, "stored")
        if record["step"] == "stored":
            with self._span("key.rotation.stop_leasing", key_id=old_id):
                await self._broker.reload()
                with contextlib.suppress(NotFound):  # already gone from this broker
                    await self._broker.stop_leasing(old_id, f"rotating to {pool}/{new_name}")
                record = await self._save(record, "draining", drain_started=self._clock.now())
            self._step_audit(record, principal, rpc, "draining")
        if record["step"] == "draining":
            with self._span("key.rotation.drain", key_id=old_id):
                await self._drain(old_id, float(record.get("drain_started") or 0))
                record = await self._save(record, "deleting")
            self._step_audit(record, principal, rpc, "deleting")
        if record["step"] == "deleting":
            with self._span("key.rotation.delete", key_id=old_id):
                await self._delete_old(record)
            await self._v(self._vault.end_rotation, pool, name)
        return record

    async def _create_replacement(self, record: dict[str, Any]) -> dict[str, Any]:
        pool, name, new_name = record["pool"], record["name"], record["new_name"]
        try:
            stored = await self._v(self._vault.key_fields, pool, new_name)
        except NotFound:
            stored = None
        if stored and stored.get("provider_hash"):  # killed after Vault stored it
            return await self._save(record, "stored", new_hash=str(stored["provider_hash"]))
        try:
            old = await self._v(self._vault.key_fields, pool, name)
        except NotFound:
            raise NotFound(f"key {pool}/{name} is no longer in Vault; nothing to rotate") \
                from None
        account = str(old.get("account") or record.get("account") or "")
        base_url = self._allowed_url(str(old.get("base_url") or self._r.management_base_url))
        manager = await self._v(self._vault.management_key, account)
        wanted = provider_name(pool, new_name)
        for left in await self._provider.list(base_url, manager):
            if left.name == wanted:  # a killed run created it; its secret never reached Vault
                await self._provider.delete(base_url, manager, left.hash)
                self._audit.record(AuditEvent.KEY_ORPHAN_DELETED, decision="deleted",
                                   pool=pool, key_id=f"{pool}/{new_name}", account=account,
                                   reason="provider key of an interrupted rotation, not in "
                                          "Vault")
        expires_in = _as_float(old.get("expires_in"))
        new_hash = await self._create_and_store(
            pool, new_name, manager, account=account, base_url=base_url,
            models=tuple(old.get("models") or ()), limit=_as_float(old.get("credit_limit")),
            limit_reset=str(old.get("limit_reset") or "") or None, expires_in=expires_in,
            daily_limit=_as_int(old.get("daily_limit")),
            minute_limit=_as_int(old.get("minute_limit")))
        return await self._save(record, "stored", new_hash=new_hash)

    async def _drain(self, key_id: str, started: float) -> None:
        timeout = self._r.drain_timeout or self._s.lease.max_ttl
        while await self._broker.active_leases(key_id) > 0:
            if self._clock.now() - started >= timeout:
                log.warning("key.rotation_drain_timeout", key_id=key_id, timeout=timeout)
                return
            await asyncio.sleep(self._r.drain_poll)

    async def _delete_old(self, record: Mapping[str, Any]) -> None:
        pool, name = record["pool"], record["name"]
        try:
            old = await self._v(self._vault.key_fields, pool, name)
        except NotFound:
            old = {}
        account = str(old.get("account") or record.get("account") or "")
        base_url = self._allowed_url(str(old.get("base_url") or self._r.management_base_url))
        manager = await self._v(self._vault.management_key, account)
        await self._provider.delete(base_url, manager, str(record["old_hash"]))
        if old:
            with contextlib.suppress(NotFound):
                await self._v(self._vault.remove_key, pool, name)
        await self._broker.reload()

    # -- revoke ------------------------------------------------------------------------------

    async def revoke(self, caller: Caller, key_id: str, reason: str = "leaked") -> Revocation:
        """A leaked key: no new lease at once, its active leases ended (no renewal, no replay;
        still reportable and completable for accounting, their units stay spent), deleted at
        the provider, removed from Vault."""
        pool, name = check_key_id(key_id)
        check_text("reason", reason, 256)
        caller.require(Rpc.REVOKE_KEY, pool)
        fields = await self._v(self._vault.key_fields, pool, name)
        account = str(fields.get("account") or "")
        with self._span("key.revoke", key_id=key_id):
            with contextlib.suppress(NotFound):
                await self._broker.stop_leasing(key_id, f"revoked: {reason}")
            # Right after new leases stopped, on every replica's shared store: a lease granted
            # before cannot be renewed or replayed from now on (audited even if a later step
            # fails; a retried revoke finds none left).
            ended = await self._broker.end_leases(key_id, account)
            get_current_span().set_attribute("keybroker.leases_ended", ended)
            self._audit.record(AuditEvent.KEY_LEASES_ENDED, decision="ended",
                               principal=caller.principal, rpc=Rpc.REVOKE_KEY, pool=pool,
                               key_id=key_id, account=account, leases_ended=ended,
                               reason=f"revoked: {reason}")
            if fields.get("provider_hash"):
                base_url = self._allowed_url(
                    str(fields.get("base_url") or self._r.management_base_url))
                manager = await self._v(self._vault.management_key, account)
                await self._provider.delete(base_url, manager, str(fields["provider_hash"]))
            await self._v(self._vault.remove_key, pool, name)
            with contextlib.suppress(NotFound):
                await self._v(self._vault.end_rotation, pool, name)
            await self._broker.reload()
        self._audit.record(AuditEvent.KEY_REVOKED, decision="revoked",
                           principal=caller.principal, rpc=Rpc.REVOKE_KEY, pool=pool,
                           key_id=key_id, reason=reason,
                           provider_deleted=bool(fields.get("provider_hash")),
                           leases_ended=ended)
        await self._refresh_quietly()
        return Revocation(bool(fields.get("provider_hash")), ended)


def _as_float(value: Any) -> float | None:
    if value in (None, ""):
        return None
    return float(value)


def _as_int(value: Any) -> int | None:
    if value in (None, ""):
        return None
    return int(value)
