"""Vault / OpenBao through hvac: the key source, the login session, and operator tasks.

Layout: a key is a KV v2 secret at ``<kv_mount>/<key_prefix>/<pool>/<name>`` whose
``ciphertext`` is the provider key encrypted by Transit (``vault:vN:...``). Other
fields: ``account``, ``base_url``, ``models`` (list), ``enabled`` (bool),
``daily_limit``, ``minute_limit`` (ints, optional). Plaintext exists only in
this process's memory.

Each ciphertext is bound to its key id and provider host: it is encrypted with a Transit
key created ``derived`` and the encryption context ``keybroker:v1|<pool>/<name>|<host>``
(`key_context`). A ciphertext copied to another key id, or an entry whose ``base_url``
was moved to another host, no longer decrypts, and that key is not loaded. A key whose
``base_url`` is not in the broker's ``openrouter.allowed_base_urls`` is not loaded either
(nor decrypted): Vault data cannot send a secret to a host the broker was not told of.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import hvac.utils
import requests
import requests.adapters
import requests.exceptions
import requests.hooks
import structlog

from .config import (
    DEFAULT_BOUND_CIDRS,
    VaultAuth,
    VaultSettings,
    check_base_url,
    normalize_base_url,
)
from .errors import BackendUnavailable, InvalidArgument, NotFound
from .models import Key, Secret
from .validate import check_name

__all__ = ["DEFAULT_BOUND_CIDRS", "KeyRecord", "NotDerived", "TransitHmac", "VaultAdmin",
           "VaultForbidden", "VaultKeySource", "VaultSession", "broker_policy_hcl", "key_context",
           "lifecycle_policy_hcl", "lifecycle_prefix",
           "operator_policy_hcl"]

log = structlog.get_logger("keybroker.vault")
_T = TypeVar("_T")
_R = TypeVar("_R")
DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"


class NotDerived(InvalidArgument):
    """The Transit key is not derived: ciphertexts cannot be bound to their key id."""


def key_context(pool: str, name: str, base_url: str) -> str:
    """The Transit encryption context (base64) binding a ciphertext to its key id and
    provider host (``host[:port]`` of ``base_url``)."""
    host = urllib.parse.urlsplit(base_url or DEFAULT_BASE_URL).netloc.lower()
    return base64.b64encode(f"keybroker:v1|{pool}/{name}|{host}".encode()).decode()


def _batch_results(exc: hvac.exceptions.VaultError) -> list[dict[str, Any]] | None:
    """The per-item results of a batch call Vault answered 400 because some items failed."""
    body = exc.json if isinstance(exc.json, dict) else None
    results = (body or {}).get("data", {}).get("batch_results") if body else None
    return list(results) if isinstance(results, list) else None


LIST_PAGE = 1000
"""Entries per ``detailed-metadata`` LIST page (about 0.5 MB of JSON)."""
TRANSIT_BATCH = 200
"""Ciphertexts per Transit decrypt call. OpenBao's listener refuses a JSON body of more than
1,000 strings (``max_request_json_strings``) and each item is four (two names, two values):
one call for every key failed from 250 keys on."""


class VaultForbidden(BackendUnavailable):
    """Vault answered 403: a missing policy, or an expired or revoked token."""


def _unreachable(what: str, exc: requests.exceptions.RequestException) -> str:
    """``vault unreachable at <address> (<what>: <Error>: <cause>)`` from a requests error."""
    url = getattr(getattr(exc, "request", None), "url", None) or ""
    parts = urlsplit(url)
    where = f"{parts.scheme}://{parts.netloc}" if parts.netloc else "the configured address"
    if isinstance(exc, requests.exceptions.Timeout):
        cause = "timed out"
    else:
        found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
        cause = found.group(1).strip().lower() if found else ""
    detail = f"{what}: {type(exc).__name__}" + (f": {cause}" if cause else "")
    return f"vault unreachable at {where} ({detail})"


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
        raise BackendUnavailable(_unreachable(what, exc), backend="vault") from None


def _verify(setting: str) -> bool | str:
    low = setting.strip().lower()
    if low in ("true", "1", "yes", ""):
        return True
    if low in ("false", "0", "no"):
        return False
    return setting


def _read_secret_file(path: str) -> str:
    return Path(path).read_text().strip() if path else ""


def _read_jwt(path: str) -> str:
    """The JWT in ``path``, read afresh (never logged: it is a credential)."""
    try:
        jwt = Path(path).read_text().strip()
    except OSError as exc:
        raise BackendUnavailable(f"vault: login: cannot read vault.jwt_file {path}: "
                                 f"{exc.strerror or type(exc).__name__}", backend="vault") from None
    if not jwt:
        raise BackendUnavailable(f"vault: login: vault.jwt_file {path} is empty", backend="vault")
    return jwt


class VaultSession:
    """An authenticated hvac client that keeps its token alive.

    Token auth renews a renewable token once ``renew_fraction`` of its TTL has
    passed. AppRole, JWT and Kubernetes auth do the same and log in again when the
    token cannot be renewed any further (max TTL), renewal is refused, or the token
    was revoked (the way Vault's LifetimeWatcher does). JWT and Kubernetes auth
    read the JWT from ``jwt_file`` at each login, since projected service-account
    tokens rotate.
    """

    def __init__(self, settings: VaultSettings) -> None:
        self._s = settings
        self._lock = threading.Lock()
        http = requests.Session()  # a connection for each concurrent key read
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(10, settings.read_concurrency))
        http.mount("http://", adapter)
        http.mount("https://", adapter)
        http.verify = _verify(settings.verify)  # hvac takes a given session's verify over its own
        self._client = hvac.Client(url=settings.addr, timeout=settings.timeout,
                                   verify=_verify(settings.verify), session=http)
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
            elif s.auth in (VaultAuth.JWT, VaultAuth.KUBERNETES):
                jwt = _read_jwt(s.jwt_file)
                mount = s.auth_mount or s.auth.value
                if s.auth is VaultAuth.JWT:
                    self._client.auth.jwt.jwt_login(role=s.role, jwt=jwt, path=mount,
                                                    use_token=True)
                else:
                    self._client.auth.kubernetes.login(role=s.role, jwt=jwt, mount_point=mount,
                                                       use_token=True)
            else:
                token = s.token or _read_secret_file(s.token_file)
                if not token:
                    raise InvalidArgument("vault.token", "no Vault token configured")
                self._client.token = token
        self._logged_in = True
        log.info("vault.login", auth=s.auth.value)

    def credentials_problem(self) -> str | None:
        """Why this session can never log in (no token, no secret_id, an unreadable file), or
        None; checked before the broker starts, which then exits instead of waiting forever."""
        s = self._s
        given = ""  # a credential given inline, which makes its file unnecessary
        if s.auth is VaultAuth.APPROLE:
            if not s.role_id:
                return "vault.role_id: required for approle auth"
            if not (s.secret_id or s.secret_id_file):
                return ("vault.secret_id: no AppRole secret_id: set KEYBROKER_VAULT_SECRET_ID "
                        "or vault.secret_id_file")
            path, setting, given = s.secret_id_file, "vault.secret_id_file", s.secret_id
        elif s.auth in (VaultAuth.JWT, VaultAuth.KUBERNETES):
            if not s.role:
                return f"vault.role: required for {s.auth.value} auth"
            # The (projected) token is read at each login; it must be there at start too.
            path, setting = s.jwt_file, "vault.jwt_file"
        else:
            if not (s.token or s.token_file):
                return ("vault.token: no Vault credentials: set KEYBROKER_VAULT_TOKEN (or "
                        "VAULT_TOKEN), vault.token_file, or vault.auth = \"approle\"")
            path, setting, given = s.token_file, "vault.token_file", s.token
        if path and not given:
            try:
                if not _read_secret_file(path):
                    return f"{setting}: {path} is empty"
            except OSError as exc:
                return f"{setting}: cannot read {path}: {exc.strerror or exc}"
        return None

    def invalidate(self) -> None:
        """Forget the token (revoked or expired): the next call logs in afresh."""
        with self._lock:
            self._logged_in = False

    def _can_relogin(self) -> bool:
        return self._s.auth is not VaultAuth.TOKEN or bool(self._s.token_file)

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

    def detailed(self, client: hvac.Client, path: str) -> dict[str, Mapping[str, Any]]:
        """Name -> KV v2 metadata of every entry under ``path`` (OpenBao's ``detailed-metadata``
        LIST, in pages of ``LIST_PAGE``); folders map to {}. hvac errors propagate untranslated,
        so the caller can tell "not supported here" from "Vault is down"."""
        out: dict[str, Mapping[str, Any]] = {}
        after = ""
        while True:
            params: dict[str, Any] = {"limit": LIST_PAGE}
            if after:
                params["after"] = after
            try:
                resp = client.adapter.list(f"/v1/{self.s.kv_mount}/detailed-metadata/{path}",
                                           params=params)
            except hvac.exceptions.InvalidPath:
                if not after:
                    raise
                return out  # nothing after the last full page
            data = (resp.get("data") if isinstance(resp, dict) else None) or {}
            keys = [str(k) for k in data.get("keys") or ()]
            info = data.get("key_info") or {}
            out.update({k: info.get(k) or {} for k in keys})
            if len(keys) < LIST_PAGE:
                return out
            after = keys[-1]

    def read(self, client: hvac.Client, pool: str, name: str, reader: _KvReader | None = None
             ) -> tuple[Mapping[str, Any], int] | None:
        """(fields, version) of one key; None when it is gone (deleted since the list)."""
        try:
            with translate_errors(f"read {pool}/{name}"):
                resp = reader.get(self.path(pool, name)) if reader is not None else None
                if resp is None:
                    resp = client.secrets.kv.v2.read_secret_version(
                        path=self.path(pool, name), mount_point=self.s.kv_mount,
                        raise_on_deleted_version=True)
        except NotFound:
            return None
        return resp["data"]["data"], int(resp["data"]["metadata"]["version"])

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
                found = self.read(client, p, name)
                if found is not None:  # else removed between list and read
                    yield p, name, found[0], found[1]


def _record(pool: str, name: str, data: Mapping[str, Any], version: int) -> KeyRecord:
    ciphertext = str(data.get("ciphertext", ""))
    return KeyRecord(
        pool=pool, name=name,
        account=str(data.get("account") or f"key:{pool}/{name}"),
        base_url=str(data.get("base_url") or DEFAULT_BASE_URL), models=_models(data.get("models")),
        enabled=_as_bool(data.get("enabled", True)), daily_limit=_as_int(data.get("daily_limit")),
        minute_limit=_as_int(data.get("minute_limit")), version=version,
        ciphertext_version=":".join(ciphertext.split(":")[:2]))


class _KvReader:
    """GETs of KV v2 data through the hvac client's own requests adapter, headers and
    settings (TLS, client certificate, proxies, timeout; the session's hooks run), without
    the per-call work of hvac and requests.Session: about half the CPU per key, which is what
    bounds loading 10,000 keys. Errors are hvac's (``hvac.utils.raise_for_error``); a
    redirect (a standby node) is left to hvac (``get`` answers None)."""

    def __init__(self, client: hvac.Client, mount: str) -> None:
        adapter = client.adapter
        self._session: requests.Session = adapter.session
        self._base = f"{adapter.base_uri.rstrip('/')}/v1/{mount}/data/"
        self._headers = {"X-Vault-Request": "true"}
        if adapter.token:
            self._headers["X-Vault-Token"] = adapter.token
        if adapter.namespace:
            self._headers["X-Vault-Namespace"] = adapter.namespace
        kw = adapter._kwargs  # what hvac passes to requests on every call
        env = self._session.merge_environment_settings(
            self._base, kw.get("proxies") or {}, None, kw.get("verify"), kw.get("cert"))
        self._send = {"timeout": kw.get("timeout"), "verify": env["verify"],
                      "cert": env["cert"], "proxies": env["proxies"]}
        self._http = self._session.get_adapter(self._base)

    def get(self, path: str) -> dict[str, Any] | None:
        url = self._base + path
        request = requests.PreparedRequest()
        request.prepare(method="GET", url=url, headers=self._headers)
        response = self._http.send(request, **self._send)
        response = requests.hooks.dispatch_hook("response", self._session.hooks, response)
        if response.is_redirect:
            return None
        try:
            body = response.json()
        except ValueError:
            body = None
        if not response.ok:
            errors = body.get("errors") if isinstance(body, dict) else None
            hvac.utils.raise_for_error("get", url, response.status_code,
                                       None if errors else response.text, errors=errors,
                                       text=response.text, json=body)
        return body if isinstance(body, dict) else None


class _Runner:
    """Maps a blocking function over items, ``concurrency`` threads at a time, in order. The
    first error is raised once the calls in flight end; calls not started are dropped."""

    def __init__(self, concurrency: int) -> None:
        self._n = max(1, concurrency)

    def __call__(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        if self._n == 1 or len(items) <= 1:
            return [fn(item) for item in items]
        pool = ThreadPoolExecutor(max_workers=min(self._n, len(items)),
                                  thread_name_prefix="vault-read")
        try:
            return list(pool.map(fn, items))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


_Fingerprint = tuple[int, str, str, str, bool]
"""What changes in a key's KV v2 metadata with every write or delete of its data: current
version, the key's and that version's created_time (a key removed and written again starts
at version 1 anew), the version's deletion_time and destroyed."""


def _fingerprint(meta: Mapping[str, Any]) -> _Fingerprint | None:
    """The fingerprint in one ``detailed-metadata`` entry (None when it has none)."""
    try:
        version = int(meta["current_version"])
    except (KeyError, TypeError, ValueError):
        return None
    current = (meta.get("versions") or {}).get(str(version)) or {}
    return (version, str(meta.get("created_time") or ""), str(current.get("created_time") or ""),
            str(current.get("deletion_time") or ""), bool(current.get("destroyed")))


@dataclass(frozen=True)
class _Loaded:
    """A key as the last load built it, with what it was built from."""

    fingerprint: _Fingerprint
    key: Key
    sealed: tuple[str, str]  # (ciphertext, context)


class VaultKeySource:
    """KeySource over KV v2 + Transit: concurrent reads, batched decrypts, incremental reloads.

    A load lists the keys once per pool with their KV metadata (OpenBao's
    ``detailed-metadata`` LIST, paged) and reads and decrypts only the keys whose current
    version (or its deletion) changed since the last load; the others are kept as they were.
    Where that listing is not available (HashiCorp Vault, or a broker policy written before
    it) every key is read again, and only ciphertexts not seen before are decrypted. Reads run
    ``vault.read_concurrency`` at a time; decrypts go in ``TRANSIT_BATCH``-sized calls.

    Args:
        session: the Vault session.
        allowed_base_urls: provider base URLs a key may use; a key with another is skipped.
        on_skip: hears the reason of each key skipped (the broker counts it).
    """

    def __init__(self, session: VaultSession, *,
                 allowed_base_urls: Iterable[str] = (DEFAULT_BASE_URL,),
                 on_skip: Callable[[str], None] | None = None) -> None:
        self._session = session
        self._layout = _Layout(session.settings)
        self._allowed = frozenset(normalize_base_url(u) for u in allowed_base_urls)
        self._on_skip = on_skip
        self._plain: dict[tuple[str, str], Secret] = {}
        self._loaded: dict[tuple[str, str], _Loaded] = {}
        self._said_no_detail = False

    async def load(self) -> list[Key]:
        try:
            return await asyncio.to_thread(self._load)
        except VaultForbidden:
            self._session.invalidate()  # an expired or revoked token: log in on the next try
            raise

    def _skip(self, key_id: str, reason: str, **fields: Any) -> None:
        log.warning("vault.key_skipped", key_id=key_id, reason=reason, **fields)
        if self._on_skip is not None:
            self._on_skip(reason)

    def _decrypt(self, client: hvac.Client, todo: list[tuple[str, str]],
                 run: _Runner) -> list[dict[str, Any]]:
        """Transit's result for each (ciphertext, context), in ``TRANSIT_BATCH``-sized calls."""
        chunks = [todo[i:i + TRANSIT_BATCH] for i in range(0, len(todo), TRANSIT_BATCH)]
        return [r for results in run(lambda c: self._decrypt_batch(client, c), chunks)
                for r in results]

    def _decrypt_batch(self, client: hvac.Client, todo: list[tuple[str, str]]
                       ) -> list[dict[str, Any]]:
        s = self._session.settings
        batch = [{"ciphertext": c, "context": ctx} for c, ctx in todo]
        with translate_errors("transit decrypt"):
            try:
                resp = client.secrets.transit.decrypt_data(
                    name=s.transit_key, mount_point=s.transit_mount, batch_input=batch)
            except hvac.exceptions.InvalidRequest as exc:
                # Vault answers 400 when any item fails; the others' results are there.
                results = _batch_results(exc)
                if results is None or len(results) != len(todo):
                    raise
                return results
        return list(resp["data"]["batch_results"])

    def _listing(self, client: hvac.Client) -> list[tuple[str, str, _Fingerprint | None]]:
        """(pool, name, fingerprint) of every key with a valid name; fingerprints are None
        when the detailed listing is not available."""
        try:
            return self._detailed_listing(client)
        except (hvac.exceptions.InvalidPath, hvac.exceptions.Forbidden,
                hvac.exceptions.UnsupportedOperation) as exc:
            # Not OpenBao, a broker policy without detailed-metadata, or no keys (404): the
            # plain list answers (or fails as it always did, e.g. with a revoked token).
            reason = type(exc).__name__
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException):
            with translate_errors(f"list {self._layout.pool_dir()}"):
                raise
        rows: list[tuple[str, str, _Fingerprint | None]] = []
        for entry in self._layout.list(client, self._layout.pool_dir()):
            if not entry.endswith("/") or not self._good_name("pool", entry[:-1]):
                continue
            pool = entry[:-1]
            rows += [(pool, name, None)
                     for name in self._layout.list(client, self._layout.pool_dir(pool))
                     if not name.endswith("/") and self._good_name("name", name, pool)]
        if rows and not self._said_no_detail:
            self._said_no_detail = True
            log.warning("vault.no_detailed_metadata", reason=reason,
                        detail="each reload reads every key; on OpenBao, `keybroker vault "
                               "bootstrap` gives the broker policy list on detailed-metadata")
        return rows

    def _detailed_listing(self, client: hvac.Client
                          ) -> list[tuple[str, str, _Fingerprint | None]]:
        top = self._layout.detailed(client, self._layout.pool_dir())
        rows: list[tuple[str, str, _Fingerprint | None]] = []
        for entry in top:
            if not entry.endswith("/") or not self._good_name("pool", entry[:-1]):
                continue
            pool = entry[:-1]
            try:
                listed = self._layout.detailed(client, self._layout.pool_dir(pool))
            except hvac.exceptions.InvalidPath:
                continue  # emptied since the first list
            for name, meta in listed.items():
                if not name.endswith("/") and self._good_name("name", name, pool):
                    rows.append((pool, name, _fingerprint(meta)))
        return rows

    @staticmethod
    def _good_name(kind: str, value: str, pool: str = "") -> bool:
        try:
            check_name(kind, value)
        except InvalidArgument:
            log.warning("vault.key_skipped", pool=pool or value, reason="bad name")
            return False
        return True

    def _load(self) -> list[Key]:
        client = self._session.client()
        run = _Runner(self._session.settings.read_concurrency)
        listing = self._listing(client)
        kept: dict[tuple[str, str], _Loaded] = {}
        fresh: list[tuple[str, str, _Fingerprint | None]] = []
        for pool, name, fp in listing:
            old = self._loaded.get((pool, name))
            # A current version with a deletion_time (now or scheduled) is read every time.
            if fp is not None and old is not None and old.fingerprint == fp and not fp[3] \
                    and not fp[4]:
                kept[(pool, name)] = old
            else:
                fresh.append((pool, name, fp))
        reader = _KvReader(client, self._session.settings.kv_mount)
        read = run(lambda row: self._layout.read(client, row[0], row[1], reader), fresh)
        entries = []
        for (pool, name, fp), found in zip(fresh, read, strict=True):
            if found is None:
                continue  # removed between list and read
            data, version = found
            key_id = f"{pool}/{name}"
            ciphertext = str(data.get("ciphertext", ""))
            if not ciphertext.startswith("vault:"):
                self._skip(key_id, "no ciphertext")
                continue
            try:
                rec = _record(pool, name, data, version)
            except (TypeError, ValueError):
                self._skip(key_id, "bad fields")
                continue
            if normalize_base_url(rec.base_url) not in self._allowed:
                self._skip(key_id, "base_url not allowed", base_url=rec.base_url[:200],
                           detail="add it to openrouter.allowed_base_urls if it is a provider")
                continue
            entries.append((rec, fp, (ciphertext, key_context(pool, name, rec.base_url))))
        todo = sorted({c for _, _, c in entries if c not in self._plain})
        failed: set[tuple[str, str]] = set()
        if todo:
            for c, result in zip(todo, self._decrypt(client, todo, run), strict=True):
                if result.get("error") or "plaintext" not in result:
                    failed.add(c)
                    continue
                self._plain[c] = Secret(base64.b64decode(result["plaintext"]).decode())
        live = {c for _, _, c in entries} | {k.sealed for k in kept.values()}
        self._plain = {c: v for c, v in self._plain.items() if c in live}
        keys = {kid: old.key for kid, old in kept.items()}
        cache = dict(kept)
        for rec, fp, c in entries:
            secret = self._plain.get(c)
            if secret is None:
                if c in failed:
                    self._skip(f"{rec.pool}/{rec.name}", "decrypt failed",
                               detail="Transit refused the ciphertext for this key id and "
                                      "host: copied from another key, base_url moved to "
                                      "another host, or not written by `keybroker keys put`")
                continue
            key = Key(pool=rec.pool, name=rec.name, account=rec.account, secret=secret,
                      base_url=rec.base_url, models=rec.models, enabled=rec.enabled,
                      daily_limit=rec.daily_limit, minute_limit=rec.minute_limit,
                      version=rec.version)
            keys[(rec.pool, rec.name)] = key
            if fp is not None:
                cache[(rec.pool, rec.name)] = _Loaded(fp, key, c)
        self._loaded = cache  # keys gone from the listing are forgotten
        return [keys[(p, n)] for p, n, _ in listing if (p, n) in keys]


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
# OpenBao: the list with each key's version, so a reload reads only the keys that changed.
path "{s.kv_mount}/detailed-metadata/{prefix}" {{
  capabilities = ["list"]
}}
path "{s.kv_mount}/detailed-metadata/{prefix}/*" {{
  capabilities = ["list"]
}}
path "{s.transit_mount}/decrypt/{s.transit_key}" {{
  capabilities = ["update"]
}}
path "{s.transit_mount}/hmac/{s.audit_hmac_key or s.transit_key}" {{
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
path "{s.transit_mount}/verify/{s.audit_hmac_key or s.transit_key}" {{
  capabilities = ["update"]
}}
# rewrap reads the key's latest version to find the keys still on older ones.
path "{s.transit_mount}/keys/{s.transit_key}" {{
  capabilities = ["read"]
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

    def bootstrap(self, *, secret_id_ttl: str = "720h", secret_id_num_uses: int = 1000,
                  bound_cidrs: Iterable[str] = DEFAULT_BOUND_CIDRS) -> dict[str, str]:
        """Idempotently create the Transit key (derived), KV v2 mount, policies and AppRole.

        The role's secret_ids expire after ``secret_id_ttl`` and ``secret_id_num_uses``
        logins (0: no limit; the broker logs in at start and again at the token's max TTL,
        24h); logins and tokens are bound to ``bound_cidrs`` (empty: anywhere).

        Returns the applied broker policy HCL, the AppRole role_id and ``derived``
        ("true", or "false" for a Transit key created before keys were bound).
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
                derived = bool(c.secrets.transit.read_key(
                    name=s.transit_key, mount_point=s.transit_mount)["data"].get("derived"))
            except hvac.exceptions.InvalidPath:
                # derived: each ciphertext is bound to its key id and host (key_context).
                c.secrets.transit.create_key(name=s.transit_key, key_type="aes256-gcm96",
                                             derived=True, mount_point=s.transit_mount)
                derived = True
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
            cidrs = [c_.strip() for c_ in bound_cidrs if c_.strip()]
            c.auth.approle.create_or_update_approle(
                role_name=self.ROLE, token_policies=[self.BROKER_POLICY], token_ttl="1h",
                token_max_ttl="24h", secret_id_ttl=secret_id_ttl,
                secret_id_num_uses=secret_id_num_uses, secret_id_bound_cidrs=cidrs,
                token_bound_cidrs=cidrs, mount_point=s.approle_mount)
            role_id = c.auth.approle.read_role_id(role_name=self.ROLE,
                                                  mount_point=s.approle_mount)["data"]["role_id"]
        return {"policy": broker_hcl, "role_id": str(role_id),
                "derived": "true" if derived else "false"}

    def new_secret_id(self) -> str:
        with translate_errors("generate secret_id"):
            resp = self._session.client().auth.approle.generate_secret_id(
                role_name=self.ROLE, mount_point=self._s.approle_mount)
        return str(resp["data"]["secret_id"])

    def put_key(self, pool: str, name: str, secret: str, *, account: str = "",
                base_url: str = "", models: tuple[str, ...] = (), enabled: bool = True,
                daily_limit: int | None = None, minute_limit: int | None = None,
                allow_http: bool = False) -> int:
        """Encrypt ``secret`` through Transit and write the key; returns the KV version.
        ``base_url`` must be https, or http on loopback; ``allow_http`` (development only)
        allows http on any host."""
        check_name("pool", pool)
        check_name("name", name)
        if account:
            check_name("account", account)
        if not secret or any(ch.isspace() for ch in secret):
            raise InvalidArgument("secret", "must be non-empty without whitespace")
        if base_url and not (allow_http and base_url.strip().startswith("http://")):
            check_base_url("base_url", base_url, allow_http_loopback=True)
        c = self._session.client()
        with translate_errors("transit encrypt"):
            ciphertext = c.secrets.transit.encrypt_data(
                name=self._s.transit_key, mount_point=self._s.transit_mount,
                plaintext=base64.b64encode(secret.encode()).decode(),
                context=key_context(pool, name, base_url))["data"]["ciphertext"]
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
        """Re-encrypt under the latest Transit key version every key not already on it.

        Raises:
            NotDerived: the Transit key predates bound ciphertexts. Transit cannot make an
                existing key derived, and operators may not decrypt, so there is no rewrap
                to a bound ciphertext: set ``vault.transit_key`` to a new name, run
                ``keybroker vault bootstrap`` (it creates that key derived), and ``keybroker
                keys put`` every key again with its secret from the provider.
        """
        c, s, count = self._session.client(), self._s, 0
        with translate_errors("transit read key"):
            info = c.secrets.transit.read_key(name=s.transit_key,
                                              mount_point=s.transit_mount)["data"]
        if not info.get("derived"):
            raise NotDerived(
                "vault.transit_key", f"{s.transit_key!r} is not derived, so its ciphertexts are not "
                "bound to their key id and host; migrate: set vault.transit_key to a new name, "
                "run `keybroker vault bootstrap`, then `keybroker keys put` each key again")
        latest = int(info["latest_version"])
        for pool, name, data, _ in list(self._layout.walk(c)):
            ciphertext = str(data.get("ciphertext", ""))
            if not ciphertext.startswith("vault:v") or ciphertext.split(":")[1] == f"v{latest}":
                continue
            context = key_context(pool, name, str(data.get("base_url") or ""))
            with translate_errors(f"rewrap {pool}/{name}"):
                new = c.secrets.transit.rewrap_data(name=s.transit_key, ciphertext=ciphertext,
                                                    context=context,
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


class TransitHmac:
    """HMACs (and verifies) audit checkpoints with a Transit key the broker cannot read."""

    def __init__(self, session: VaultSession) -> None:
        self._session = session
        s = session.settings
        self._key, self._mount = s.audit_hmac_key or s.transit_key, s.transit_mount

    def hmac(self, data: bytes) -> str:
        """Transit's ``vault:vN:...`` HMAC-SHA256 of ``data``."""
        with translate_errors("transit hmac"):
            return str(self._session.client().secrets.transit.generate_hmac(
                name=self._key, hash_input=base64.b64encode(data).decode(),
                algorithm="sha2-256", mount_point=self._mount)["data"]["hmac"])

    def verify(self, data: bytes, hmac: str) -> bool:
        """Whether ``hmac`` is Transit's HMAC of ``data`` under the key."""
        with translate_errors("transit verify"):
            return bool(self._session.client().secrets.transit.verify_signed_data(
                name=self._key, hash_input=base64.b64encode(data).decode(), hmac=hmac,
                hash_algorithm="sha2-256", mount_point=self._mount)["data"]["valid"])
