"""Typed, frozen settings, read once from a TOML file plus ``KEYBROKER_*`` variables.

Every scalar setting ``<section>.<field>`` can be overridden by the environment
variable ``KEYBROKER_<SECTION>_<FIELD>`` (top-level fields: ``KEYBROKER_<FIELD>``).
Per-pool and per-account tables come from the file only.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import ipaddress
import math
import os
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidArgument

__all__ = [
    "DEFAULT_BOUND_CIDRS",
    "MAX_WORKERS",
    "OTHER_ENV",
    "AccountSettings",
    "AlertSettings",
    "ConfigError",
    "HealthSettings",
    "LeaseSettings",
    "ModelPolicy",
    "OpenRouterSettings",
    "PoolSettings",
    "QuotaSettings",
    "Settings",
    "StoreBackend",
    "StoreSettings",
    "StrategyName",
    "TlsSettings",
    "VaultAuth",
    "VaultSettings",
    "check_base_url",
    "is_loopback",
    "is_loopback_host",
    "load_settings",
    "normalize_base_url",
    "validate_settings",
    "worker_count",
]


class ConfigError(InvalidArgument):
    """Configuration a person must fix (a file, a setting, an environment variable): the
    message is one line naming where and what; the CLI prints it and exits with status 2."""


def nearest(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or nothing."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


DEFAULT_BOUND_CIDRS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8")
"""Where the broker's AppRole may log in from and use its token, as ``keybroker vault
bootstrap`` sets it by default: private networks and loopback (``--bound-cidrs``)."""


class StoreBackend(enum.StrEnum):
    SQLITE = "sqlite"
    REDIS = "redis"


class VaultAuth(enum.StrEnum):
    TOKEN = "token"
    APPROLE = "approle"
    JWT = "jwt"
    KUBERNETES = "kubernetes"


SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
"""Where Kubernetes mounts a pod's service-account token (the default ``vault.jwt_file``)."""


class StrategyName(enum.StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_USED = "least_used"
    PERFORMANCE_BASED = "performance_based"
    INTELLIGENT = "intelligent"


class ModelPolicy(enum.StrEnum):
    """How ``LeaseKey(model="auto")`` picks a model from the provider's catalog."""

    FREE_FIRST = "free_first"
    CHEAPEST = "cheapest"
    ALLOWLIST = "allowlist"


@dataclass(frozen=True)
class StoreSettings:
    backend: StoreBackend = StoreBackend.SQLITE
    """Which state store holds counters, leases and health."""
    sqlite_path: str = "keybroker.db"
    """SQLite database file (WAL mode). Holds no secret."""
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    """Redis URL for the ``redis`` backend; ``rediss://`` for TLS, a password may be in it."""
    redis_timeout: float = 0.5
    """Seconds a Redis connect or call may take before it fails as UNAVAILABLE."""
    redis_prefix: str = "kb"
    """Namespace of every Redis key the broker writes (replicas sharing state share it)."""
    redis_cluster: bool = False
    """Speak Redis Cluster (``redis_url`` names any one node); each reservation runs on the
    slot of one account, and a LeaseKey with a request_id costs one more round trip."""


@dataclass(frozen=True)
class VaultSettings:
    addr: str = "http://127.0.0.1:8200"
    """Vault or OpenBao address."""
    auth: VaultAuth = VaultAuth.TOKEN
    """``token``, ``approle``, ``jwt`` or ``kubernetes`` (the last two log in with the JWT in
    jwt_file, e.g. the pod's service-account token)."""
    token: str = field(default="", repr=False)
    """Token for ``token`` auth; prefer the environment (KEYBROKER_VAULT_TOKEN or VAULT_TOKEN)."""
    token_file: str = ""
    """File holding the token (read at start and at each re-login)."""
    role_id: str = ""
    """AppRole role_id for ``approle`` auth."""
    secret_id: str = field(default="", repr=False)
    """AppRole secret_id; prefer KEYBROKER_VAULT_SECRET_ID or secret_id_file."""
    secret_id_file: str = ""
    """File holding the AppRole secret_id."""
    approle_mount: str = "approle"
    """Mount path of the AppRole auth method."""
    role: str = ""
    """Vault role to log in as with ``jwt`` or ``kubernetes`` auth."""
    jwt_file: str = SERVICE_ACCOUNT_TOKEN
    """File holding the JWT for ``jwt`` and ``kubernetes`` auth, re-read at each login
    (projected service-account tokens rotate)."""
    auth_mount: str = ""
    """Mount path of the ``jwt`` or ``kubernetes`` auth method; empty: the method's name."""
    kv_mount: str = "keybroker"
    """KV v2 mount holding the keys."""
    key_prefix: str = "keys"
    """Path under the KV mount: keys live at ``<prefix>/<pool>/<name>``."""
    transit_mount: str = "transit"
    """Transit secrets engine mount."""
    transit_key: str = "keybroker"
    """Transit key (aes256-gcm96) the key secrets are encrypted with."""
    reload_interval: float = 30.0
    """Seconds between re-reads of the key list."""
    read_concurrency: int = 16
    """Vault requests in flight at once while loading keys (KV reads, Transit decrypts), 1 to
    256."""
    timeout: float = 5.0
    """Seconds before a Vault request gives up."""
    verify: str = "true"
    """TLS verification: ``true``, ``false`` or a CA bundle path."""
    renew_fraction: float = 0.67
    """Renew the Vault token once this fraction of its TTL has passed."""
    audit_hmac_key: str = ""
    """Transit key that HMACs audit checkpoints; empty: ``transit_key``. The broker's policy
    needs ``update`` on ``<transit_mount>/hmac/<key>``, a verifier's on ``.../verify/<key>``."""


@dataclass(frozen=True)
class TlsSettings:
    cert_file: str = ""
    """Server certificate (PEM). Empty: plaintext gRPC (loopback and tests only)."""
    key_file: str = ""
    """Server private key (PEM)."""
    client_ca_file: str = ""
    """CA that signs client certificates; enables mTLS principals (needs require_client_cert)."""
    require_client_cert: bool = False
    """Require a client certificate on every connection (must be true with client_ca_file)."""
    insecure_plaintext: bool = False
    """Serve plaintext gRPC on a non-loopback ``listen`` address (tokens and provider keys then
    cross the network in the clear). Without it, such a ``listen`` needs cert_file; with
    cert_file set it changes nothing."""


@dataclass(frozen=True)
class LeaseSettings:
    default_ttl: float = 60.0
    """Lease TTL in seconds when the caller gives none."""
    max_ttl: float = 3600.0
    """Longest TTL a caller may ask for."""
    max_units: int = 1000
    """Most units one lease may reserve."""
    sweep_interval: float = 1.0
    """Seconds between sweeps that expire overdue leases."""
    retention_days: int = 2
    """Days finished leases (and their idempotency records) are kept."""
    usage_retention_days: int = 31
    """Days of usage analytics (GetUsage, keybroker usage) kept."""
    report_grace: float = 60.0
    """Seconds after a lease ended (completed or expired; ended by its key's revocation: after
    the expiry it had) its ReportUsage is still accepted; later reports are refused
    (FAILED_PRECONDITION) and change nothing."""
    usage_max_rows: int = 10000
    """Most rows one GetUsage page holds (a larger page_size is lowered to it); the rest of
    the answer comes on the next pages (next_page_token)."""


@dataclass(frozen=True)
class QuotaSettings:
    daily_limit: int = 50
    """Default requests per account per UTC day (OpenRouter free tier)."""
    minute_limit: int = 20
    """Default requests per account per calendar minute."""
    cooldown_seconds: float = 60.0
    """First backoff after a 429 that names no reset time; doubles per repeat."""
    max_cooldown_seconds: float = 3600.0
    """Longest backoff."""


@dataclass(frozen=True)
class HealthSettings:
    failure_threshold: int = 5
    """Consecutive 5xx/408/timeouts that open a key's circuit."""
    circuit_seconds: float = 30.0
    """First circuit-open backoff; doubles per further failure."""
    max_circuit_seconds: float = 600.0
    """Longest circuit-open backoff."""
    probe_timeout: float = 60.0
    """How long a half-open key waits for its probe lease's report before probing again."""
    jitter: float = 0.1
    """Relative random spread applied to backoffs (0.1 = +-10%)."""
    stats_half_life: float = 3600.0
    """Seconds after which a key's success/failure evidence counts half."""
    max_retry_after: float = 3600.0
    """Longest cooldown a reported 429's Retry-After may set; longer values are cut to it."""
    reset_margin: float = 300.0
    """Seconds past the next 00:00 UTC a reported 429's reset time may lie (the provider's
    limits are per minute and per UTC day); later resets are cut to it."""


@dataclass(frozen=True)
class AlertSettings:
    interval: float = 15.0
    """Seconds between evaluations of the alert rules."""
    pool_below_fraction: float = 0.1
    """Alert when a pool has less than this share of today's quota left."""
    error_rate: float = 0.5
    """Alert when more than this share of a pool's reports failed within error_window."""
    error_window: float = 300.0
    """Seconds of reports the error rate is computed over."""
    error_min_reports: int = 20
    """Fewest reports in the window before the error rate counts."""
    vault_down_seconds: float = 60.0
    """Alert when Vault has been unreachable this long."""
    webhooks: str = ""
    """Comma-separated webhook URLs (Slack-compatible JSON with a "text" field)."""
    webhook_retries: int = 3
    """Attempts per webhook delivery (exponential backoff between them)."""
    webhook_timeout: float = 5.0
    """Seconds before one webhook attempt gives up."""


@dataclass(frozen=True)
class OpenRouterSettings:
    probe_interval: float = 0.0
    """Seconds between key probes (``GET <base_url>/key`` per key, no quota cost; jittered);
    0: no probes."""
    probe_concurrency: int = 4
    """Most key probes in flight at once."""
    probe_timeout: float = 10.0
    """Seconds one key probe may take."""
    probe_jitter: float = 0.2
    """Relative random spread of the probe interval (0.2 = +-20%)."""
    catalog_ttl: float = 300.0
    """Seconds the model catalog (``GET <base_url>/models``) is cached for ``model = "auto"``."""
    catalog_timeout: float = 10.0
    """Seconds one catalog fetch may take."""
    allowed_base_urls: tuple[str, ...] = ("https://openrouter.ai/api/v1",)
    """Provider base URLs a key may use (a TOML list or comma-separated), compared exactly
    (a trailing ``/`` aside). A key in Vault whose ``base_url`` is not listed is not loaded,
    leased or probed (log ``vault.key_skipped``, metric ``keybroker_keys_skipped``): Vault
    data cannot send a secret elsewhere. https only, unless allow_http_loopback."""
    allow_http_loopback: bool = False
    """Development only: allowed_base_urls may list ``http://`` URLs on a loopback host
    (127.0.0.0/8, ::1, localhost), e.g. the OpenRouter emulator that ``keybroker dev`` runs."""
    allow_http_hosts: tuple[str, ...] = ()
    """Development only: host names whose ``http://`` URLs allowed_base_urls may list besides
    loopback, e.g. ``emulator``, the compose demo stack's OpenRouter emulator service."""


@dataclass(frozen=True)
class RotationSettings:
    interval: float = 0.0
    """Seconds between the broker's rotation rounds (the first runs once keys are loaded):
    resume rotations a killed or failed run left, then rotate managed keys that are too old
    or near ``expires_at``. 0: no rounds (``keybroker keys rotate`` and KeyAdmin.RotateKey
    still work, and resume an interrupted rotation of their key). Rounds need the broker's
    Vault token to hold the lifecycle policy (``keybroker.vault.lifecycle_policy_hcl``)."""
    max_age_days: float = 0.0
    """Rotate a key provisioned through the management API once it is this many days old;
    0: never by age. A pool's ``rotation_max_age_days`` overrides it."""
    expiry_margin_days: float = 7.0
    """Rotate a key this many days before its provider-side ``expires_at``."""
    drain_timeout: float = 0.0
    """Most seconds a rotation waits for the old key's active leases to end before deleting
    it; 0: ``lease.max_ttl`` (no lease outlives it)."""
    drain_poll: float = 0.5
    """Seconds between checks of the old key's active leases while draining."""
    claim_seconds: float = 60.0
    """How long a run's claim on a rotation lasts without progress; another broker (or the
    next run after a crash) takes it over once it lapses."""
    management_base_url: str = "https://openrouter.ai/api/v1"
    """Provider base URL of provisioned keys (their management API is ``<base>/keys``)."""
    management_timeout: float = 10.0
    """Seconds one management API call may take."""


@dataclass(frozen=True)
class PoolSettings:
    strategy: StrategyName = StrategyName.ROUND_ROBIN
    """Rotation strategy of the pool."""
    daily_limit: int | None = None
    """Per-account daily limit for accounts of this pool (default: quota.daily_limit)."""
    minute_limit: int | None = None
    """Per-account per-minute limit (default: quota.minute_limit)."""
    reserve_high_fraction: float = 0.0
    """Share of the pool's daily quota kept for high priority; shrinks linearly to 0 at 00:00 UTC."""
    pace_low: bool = False
    """Pace low-priority requests so they spread over the UTC day."""
    pace_burst_fraction: float = 0.05
    """Share of the daily quota low priority may run ahead of an even pace."""
    model_policy: ModelPolicy = ModelPolicy.FREE_FIRST
    """How ``model = "auto"`` picks from the provider's model catalog: ``free_first`` (a free
    model if one fits, else the cheapest), ``cheapest``, or ``allowlist`` (the first of
    model_allowlist that fits)."""
    model_allowlist: tuple[str, ...] = ()
    """Models ``auto`` may pick (a TOML list or comma-separated), in order of preference for
    ``allowlist``; empty: any."""
    min_context: int = 0
    """Smallest context length (tokens) a model picked by ``auto`` must have."""
    required_parameters: tuple[str, ...] = ()
    """Request parameters a model picked by ``auto`` must support, e.g. ``["tools"]``."""
    rotation_max_age_days: float | None = None
    """Rotate this pool's managed keys once they are this many days old (0: never by age);
    unset: ``rotation.max_age_days``."""


@dataclass(frozen=True)
class AccountSettings:
    daily_limit: int | None = None
    """This account's daily limit (e.g. 1000 after buying credits)."""
    minute_limit: int | None = None
    """This account's per-minute limit."""


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    """gRPC listen address (``host:port``; port 0 picks a free one)."""
    policy_file: str = ""
    """Access policy (TOML). Empty: every RPC is denied (deny by default)."""
    log_level: str = "info"
    """Log level: debug, info, warning, error."""
    log_format: str = "json"
    """``json`` (one JSON object a line) or ``console``."""
    metrics_listen: str = ""
    """Prometheus /metrics address (``host:port``); empty: no metrics endpoint."""
    audit_file: str = ""
    """Append-only JSON-lines audit file (besides the log); empty: log only. Each line is
    hash-chained to the one before (``keybroker audit verify``)."""
    audit_rotate_bytes: int = 0
    """Rotate the audit file at this size: it becomes ``FILE.N`` (next free N) and a new FILE
    continues the chain. 0: never."""
    audit_checkpoint_seconds: float = 60.0
    """How often the broker appends an ``audit.checkpoint`` record HMAC'd by Vault Transit
    (when records were written since the last one; needs Vault: ``vault.audit_hmac_key``).
    0: no checkpoints."""
    reflection: bool | None = None
    """gRPC server reflection (what grpcurl uses; it answers without a token and lists every
    service). Unset: on only when ``listen`` is a loopback address."""
    workers: str = "1"
    """``keybroker serve`` processes serving ``listen`` together (``--workers``): a number, or
    ``auto`` for one per CPU core. Each has its own event loop; all share the one store
    (SQLite in WAL, or Redis). Above 1 a supervisor process holds the port, starts them and
    restarts one that crashes (see README, "Every core")."""
    clock_offset: float = 0.0
    """For tests only: seconds added to the system clock (quota windows, TTLs, cooldowns), so a
    broker process can cross 00:00 UTC or run skewed from its peers. Leave 0 in production."""
    store: StoreSettings = StoreSettings()
    vault: VaultSettings = VaultSettings()
    tls: TlsSettings = TlsSettings()
    lease: LeaseSettings = LeaseSettings()
    quota: QuotaSettings = QuotaSettings()
    health: HealthSettings = HealthSettings()
    alerts: AlertSettings = AlertSettings()
    openrouter: OpenRouterSettings = OpenRouterSettings()
    rotation: RotationSettings = RotationSettings()
    pools: Mapping[str, PoolSettings] = field(default_factory=dict)
    accounts: Mapping[str, AccountSettings] = field(default_factory=dict)

    def pool(self, name: str) -> PoolSettings:
        return self.pools.get(name, PoolSettings())

    def limits(self, pool: str, account: str) -> tuple[int, int]:
        """(daily, minute) limits of ``account`` when leased through ``pool``."""
        p = self.pool(pool)
        a = self.accounts.get(account, AccountSettings())
        daily = a.daily_limit if a.daily_limit is not None else p.daily_limit
        minute = a.minute_limit if a.minute_limit is not None else p.minute_limit
        return (
            daily if daily is not None else self.quota.daily_limit,
            minute if minute is not None else self.quota.minute_limit,
        )


_SECTIONS = {"store": StoreSettings, "vault": VaultSettings, "tls": TlsSettings,
             "lease": LeaseSettings, "quota": QuotaSettings, "health": HealthSettings,
             "alerts": AlertSettings, "openrouter": OpenRouterSettings,
             "rotation": RotationSettings}
# Conventional variables honoured when the KEYBROKER_ one is absent.
_FALLBACK_ENV = {"KEYBROKER_VAULT_ADDR": "VAULT_ADDR", "KEYBROKER_VAULT_TOKEN": "VAULT_TOKEN"}


def _coerce(name: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(name, inner[0], value)
    try:
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            try:
                return tp(str(value).lower())
            except ValueError:
                choices = ", ".join(str(m.value) for m in tp)
                raise InvalidArgument(name, f"cannot use {value!r}; choose one of {choices}"
                                      ) from None
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if origin is tuple:  # tuple[str, ...]: a TOML list, or a comma-separated string
            items = value if isinstance(value, list | tuple) else str(value).split(",")
            return tuple(str(v).strip() for v in items if str(v).strip())
    except ValueError as exc:
        raise InvalidArgument(name, f"cannot use {value!r}: {exc}") from None
    raise InvalidArgument(name, f"unsupported setting type {tp!r}")


def _build(cls: type[Any], prefix: str, data: Any, env: Mapping[str, str],
           where: str = "") -> Any:
    """``cls`` from one TOML table (``where`` names it in errors, e.g. ``[pools.free]``) and
    the KEYBROKER_<PREFIX>_<FIELD> variables."""
    where = where or (f"[{prefix}]" if prefix else "top level")
    if not isinstance(data, Mapping):
        raise InvalidArgument(where, "must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    tables = set(_SECTIONS) | {"pools", "accounts"} if cls is Settings else set()
    for name in sorted(set(data) - known - tables):
        raise InvalidArgument(where, f"unknown setting {name!r}{nearest(name, known | tables)}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) or f.name in ("pools", "accounts"):
            continue
        var = f"KEYBROKER_{prefix.upper()}_{f.name.upper()}" if prefix else f"KEYBROKER_{f.name.upper()}"
        label = f"{where}: {f.name}" if where.startswith("[") else f.name
        # Precedence: KEYBROKER_* variable, then the file, then VAULT_ADDR/VAULT_TOKEN.
        if var in env:
            kwargs[f.name] = _coerce(var, tp, env[var])
        elif f.name in data:
            kwargs[f.name] = _coerce(label, tp, data[f.name])
        elif var in _FALLBACK_ENV and _FALLBACK_ENV[var] in env:
            kwargs[f.name] = _coerce(var, tp, env[_FALLBACK_ENV[var]])
    return cls(**kwargs)


OTHER_ENV: dict[str, str] = {
    "KEYBROKER_CONFIG": "the TOML settings file (--config)",
    "KEYBROKER_TARGET": "the broker address the CLI's client commands call (--target)",
    "KEYBROKER_ADDR": "a broker address, read by clients and examples",
    "KEYBROKER_TOKEN": "the bearer token the CLI's client commands send",
    "KEYBROKER_ADMIN_TOKEN": "the operator token `keybroker dev` writes to .keybroker/env",
    "KEYBROKER_CERT_FILE": "the client certificate of exec, lease and complete (mTLS)",
    "KEYBROKER_KEY_FILE": "the client key of exec, lease and complete (mTLS)",
    "KEYBROKER_LEASE_ID": "the lease `keybroker complete` ends (set by exec and lease --env)",
    "KEYBROKER_TLS_TARGET": "the node client's mTLS test: the broker address",
    "KEYBROKER_CA_FILE": "the node client's mTLS test: the CA file",
    "KEYBROKER_CLIENT_CERT_FILE": "the node client's mTLS test: the client certificate",
    "KEYBROKER_CLIENT_KEY_FILE": "the node client's mTLS test: the client key",
    "KEYBROKER_WORKER_SLOT": "set by `serve --workers N` for its workers: slot:supervisor pid",
    "KEYBROKER_WORKER_FD": "set by `serve --workers N`: the pipe a worker says it serves on",
}
"""KEYBROKER_* variables that are not settings but are read by the CLI, clients or tests;
``KEYBROKER_TOKEN_<NAME>`` (a test principal's token) is known too."""


def known_env() -> set[str]:
    """Every KEYBROKER_* variable name anything in the project reads (see `OTHER_ENV`)."""
    names = set(OTHER_ENV)
    for prefix, cls in (("", Settings), *_SECTIONS.items()):
        for f in dataclasses.fields(cls):
            if f.name not in _SECTIONS and f.name not in ("pools", "accounts"):
                names.add(f"KEYBROKER_{prefix.upper()}_{f.name.upper()}" if prefix
                          else f"KEYBROKER_{f.name.upper()}")
    return names


def check_env(env: Mapping[str, str]) -> None:
    """Refuse a KEYBROKER_* variable nothing reads: a typo (``KEYBROKER_STORE_BACKND``) would
    otherwise be silently ignored.

    Raises:
        ConfigError: naming the variable and the nearest known one.
    """
    known = known_env()
    for name in sorted(env):
        if (name.startswith("KEYBROKER_") and name not in known
                and not name.startswith("KEYBROKER_TOKEN_")):
            raise ConfigError(name, f"unknown environment variable{nearest(name, known)}")


def load_settings(path: str | os.PathLike[str] | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from an optional TOML file and an environment mapping.

    Raises:
        ConfigError: the file is missing or not TOML, a name is unknown (a setting in the
            file or a KEYBROKER_* variable), or a value has the wrong type; the message names
            the file, the section and the setting.
        InvalidArgument: settings contradict each other.
    """
    env = os.environ if env is None else env
    check_env(env)
    data: dict[str, Any] = {}
    if path:
        try:
            with Path(path).open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(str(path), "no such file (--config or KEYBROKER_CONFIG)") from None
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    try:
        sections = {name: _build(cls, name, data.get(name, {}), env)
                    for name, cls in _SECTIONS.items()}
        pools = {name: _build(PoolSettings, "", table, {}, f"[pools.{name}]")
                 for name, table in _tables(data, "pools").items()}
        accounts = {name: _build(AccountSettings, "", table, {}, f"[accounts.{name}]")
                    for name, table in _tables(data, "accounts").items()}
        top = _build(Settings, "", {k: v for k, v in data.items() if k not in _SECTIONS}, env)
        settings: Settings = dataclasses.replace(top, pools=pools, accounts=accounts,
                                                 **sections)
        validate_settings(settings)
    except ConfigError:
        raise
    except InvalidArgument as exc:
        where = f"{path}: " if path and not exc.field.startswith("KEYBROKER_") else ""
        raise ConfigError(f"{where}{exc.field}", exc.message.removeprefix(f"{exc.field}: ")
                          ) from None
    return settings


def _tables(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    tables = data.get(name, {})
    if not isinstance(tables, Mapping):
        raise InvalidArgument(f"[{name}]", "must be a table of tables")
    return tables


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or address, IPv6 with or without brackets) is loopback."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_base_url(url: str) -> str:
    """``url`` as base URLs are compared: without a trailing ``/``."""
    return url.strip().rstrip("/")


def check_base_url(field: str, url: str, allow_http_loopback: bool,
                   http_hosts: Iterable[str] = ()) -> None:
    """Raise InvalidArgument unless ``url`` is https (or http on loopback when allowed, or on
    one of ``http_hosts``)."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname:
        if parts.hostname.lower() in {h.lower() for h in http_hosts}:
            return
        if not is_loopback_host(parts.hostname):
            raise InvalidArgument(field, f"{url!r}: must be https (http only on loopback)")
        if not allow_http_loopback:
            raise InvalidArgument(field, f"{url!r}: http needs openrouter.allow_http_loopback "
                                         "= true (development only)")
        return
    raise InvalidArgument(field, f"{url!r}: must be an https:// URL")


def validate_settings(s: Settings) -> None:
    """Raise InvalidArgument when settings contradict each other."""
    if s.lease.default_ttl <= 0 or s.lease.max_ttl < s.lease.default_ttl:
        raise InvalidArgument("lease", "need 0 < default_ttl <= max_ttl")
    if s.lease.report_grace < 0 or s.lease.usage_max_rows < 1:
        raise InvalidArgument("lease", "need report_grace >= 0 and usage_max_rows >= 1")
    if s.health.max_retry_after <= 0 or s.health.reset_margin < 0:
        raise InvalidArgument("health", "need max_retry_after > 0 and reset_margin >= 0")
    if s.quota.daily_limit < 0 or s.quota.minute_limit < 0:
        raise InvalidArgument("quota", "limits must be >= 0")
    for name, p in s.pools.items():
        for v in (p.daily_limit, p.minute_limit):
            if v is not None and v < 0:
                raise InvalidArgument(f"pools.{name}", "limits must be >= 0")
        if not (0.0 <= p.reserve_high_fraction < 1.0 and 0.0 <= p.pace_burst_fraction <= 1.0):
            raise InvalidArgument(f"pools.{name}", "fractions must be within [0, 1)")
        if p.model_policy is ModelPolicy.ALLOWLIST and not p.model_allowlist:
            raise InvalidArgument(f"pools.{name}.model_allowlist", "required by model_policy allowlist")
    r = s.rotation
    if (r.interval < 0 or r.max_age_days < 0 or r.expiry_margin_days < 0 or r.drain_timeout < 0
            or r.drain_poll <= 0 or r.claim_seconds <= 0 or r.management_timeout <= 0):
        raise InvalidArgument("rotation", "need interval, max_age_days, expiry_margin_days and "
                                          "drain_timeout >= 0, the others > 0")
    for name, p in s.pools.items():
        if p.rotation_max_age_days is not None and p.rotation_max_age_days < 0:
            raise InvalidArgument(f"pools.{name}.rotation_max_age_days", "must be >= 0")
    if not r.interval and (r.max_age_days or any(p.rotation_max_age_days
                                                 for p in s.pools.values())):
        raise InvalidArgument("rotation.interval", "must be > 0 (e.g. 3600) for "
                                                   "max_age_days to rotate anything")
    o = s.openrouter
    if o.probe_interval < 0 or o.probe_concurrency < 1 or not 0.0 <= o.probe_jitter < 1.0:
        raise InvalidArgument("openrouter", "need probe_interval >= 0, probe_concurrency >= 1 "
                                            "and 0 <= probe_jitter < 1")
    for url in o.allowed_base_urls:
        check_base_url("openrouter.allowed_base_urls", url, o.allow_http_loopback,
                       o.allow_http_hosts)
    if s.tls.client_ca_file and not s.tls.require_client_cert:
        # grpc's Python server cannot ask for an optional client certificate: without
        # require_client_cert it never requests one, and mTLS principals could not log in.
        raise InvalidArgument("tls.require_client_cert", "must be true when client_ca_file is set")
    if (s.tls.cert_file or s.tls.key_file) and not (s.tls.cert_file and s.tls.key_file):
        raise InvalidArgument("tls", "cert_file and key_file go together")
    if s.audit_rotate_bytes < 0 or s.audit_checkpoint_seconds < 0:
        raise InvalidArgument("audit_rotate_bytes", "audit_rotate_bytes and "
                              "audit_checkpoint_seconds must be >= 0")
    worker_count(s.workers)
    if not math.isfinite(s.clock_offset):
        raise InvalidArgument("clock_offset", "must be a finite number of seconds")
    if s.store.redis_timeout <= 0:
        raise InvalidArgument("store.redis_timeout", "must be > 0")
    if any(c in s.store.redis_prefix for c in "{}"):
        raise InvalidArgument("store.redis_prefix", "must not contain { or } (hash tags)")
    if not 1 <= s.vault.read_concurrency <= 256:
        raise InvalidArgument("vault.read_concurrency", "must be 1 to 256 (threads that read "
                                                         "Vault while loading keys)")
    if s.vault.auth is VaultAuth.APPROLE and not s.vault.role_id:
        raise InvalidArgument("vault.role_id", "required for approle auth")
    if s.vault.auth in (VaultAuth.JWT, VaultAuth.KUBERNETES):
        if not s.vault.role:
            raise InvalidArgument("vault.role", f"required for {s.vault.auth.value} auth "
                                                "(the Vault role to log in as)")
        if not s.vault.jwt_file:
            raise InvalidArgument("vault.jwt_file", f"required for {s.vault.auth.value} auth")
    if not s.tls.cert_file and not s.tls.insecure_plaintext and not is_loopback(s.listen):
        raise InvalidArgument(
            "listen", f"{s.listen} is reachable from other machines, and without TLS bearer "
                      "tokens and provider keys would cross the network in the clear: set "
                      "tls.cert_file and tls.key_file (KEYBROKER_TLS_CERT_FILE/_KEY_FILE), or "
                      "tls.insecure_plaintext = true to accept that")


MAX_WORKERS = 256


def worker_count(workers: str) -> int:
    """The number of ``serve`` processes ``workers`` asks for (``auto``: the CPU cores this
    process may run on). Raises InvalidArgument naming the setting."""
    text = str(workers).strip().lower()
    if text == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_WORKERS:
        raise InvalidArgument("workers", f"{workers!r}: must be a number from 1 to "
                                         f"{MAX_WORKERS}, or auto (one per CPU core)")
    return n


def is_loopback(listen: str) -> bool:
    """True when a gRPC ``listen`` address is reachable from this machine only."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    return is_loopback_host(listen.rpartition(":")[0] if ":" in listen else listen)
