"""Access control: principals, roles and the policy file that binds them.

A policy is TOML::

    [roles.consumer]
    rpcs = ["LeaseKey", "RenewLease", "ReportUsage", "Complete"]
    pools = ["free"]
    priorities = ["high", "normal", "low"]   # LeaseKey priorities; default ["normal", "low"]

    [roles.admin]
    rpcs = ["*"]          # every RPC; "KeyBroker/*" and "KeyAdmin/*" name one service
    pools = ["*"]         # every pool; ReloadKeys needs "*"

    [[principals]]
    name = "billing-svc"
    token_sha256 = "<hex sha256 of the bearer token>"   # `keybroker token new` makes one
    roles = ["consumer"]

    [[principals]]
    name = "search-svc"           # several tokens at once: rotate without downtime
    roles = ["consumer"]
    tokens = [
      {sha256 = "<old token's sha256>", not_after = 2026-12-31T00:00:00Z},
      {sha256 = "<new token's sha256>", not_before = 2026-12-20T00:00:00Z},
    ]
    [principals.limits.free]      # per pool, beside the account quotas (units)
    daily = 500                   # per UTC day
    minute = 20                   # per calendar minute
    daily_share = 0.25            # of the pool's daily capacity

    [[principals]]
    name = "batch-svc"
    mtls_cn = "batch-svc.internal"    # client certificate subject CN (needs tls.client_ca_file)
    roles = ["consumer"]

Tokens are kept only as SHA-256 hashes and compared in constant time. ``not_before`` and
``not_after`` (TOML date-times or RFC 3339 strings; UTC without an offset) bound when a
token is accepted; outside them it answers UNAUTHENTICATED with the reason
``TOKEN_NOT_YET_VALID`` or ``TOKEN_EXPIRED``. A principal's ``limits`` are charged in the
same atomic reservation as the account quotas (not on Redis Cluster, see
``broker.engine.windows``). Anything
not granted is denied. High priority (which may spend the reserve and skips pacing) is a
grant too: only a role that lists ``"high"`` in ``priorities`` may ask for it.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import math
import re
import secrets
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from .errors import (
    InvalidArgument,
    PermissionDenied,
    TokenExpired,
    TokenNotYetValid,
    Unauthenticated,
)
from .models import PrincipalLimits, Priority
from .rpcs import KEY_ADMIN_RPCS, KEY_BROKER_RPCS, Rpc

__all__ = ["DEFAULT_PRIORITIES", "PRINCIPAL_KEYS", "ROLE_KEYS", "Policy", "Principal", "RoleGrant",
           "TokenHash", "hash_token", "new_token", "parse_bearer"]

_ALIASES: dict[str, frozenset[Rpc]] = {"*": KEY_BROKER_RPCS | KEY_ADMIN_RPCS,
                                       "KeyBroker/*": KEY_BROKER_RPCS,
                                       "KeyAdmin/*": KEY_ADMIN_RPCS}
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PRIORITIES = {p.name.lower(): p for p in Priority}
# The keys each table of a policy file may have: anything else is a typo, refused (a
# misspelt ``token_sha256`` would otherwise leave a principal that can never log in).
POLICY_KEYS = frozenset({"roles", "principals"})
ROLE_KEYS = frozenset({"rpcs", "pools", "priorities"})
PRINCIPAL_KEYS = frozenset({"name", "token_sha256", "tokens", "mtls_cn", "roles", "limits"})
DEFAULT_PRIORITIES: frozenset[Priority] = frozenset({Priority.NORMAL, Priority.LOW})
"""What a role may ask for when it names no ``priorities``: everything but high."""


def new_token() -> str:
    """A fresh bearer token (256 random bits)."""
    return "kbt_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_bearer(header: str | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` value; None when absent.

    Raises:
        Unauthenticated: the header is there but malformed.
    """
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("malformed authorization header; expected 'Bearer <token>'")
    if not _TOKEN.fullmatch(token):
        # The header's shape is right; say what is wrong with the token itself.
        if len(token) < 16 or len(token) > 512:
            raise Unauthenticated(f"bearer token is {len(token)} characters; tokens have "
                                  "16 to 512 (`keybroker token new` makes one)")
        raise Unauthenticated("bearer token has characters outside A-Z a-z 0-9 . _ ~ + / = -")
    return token


@dataclass(frozen=True)
class RoleGrant:
    """What one role permits: these RPCs on these pools (``*``: every pool), at these
    lease priorities."""

    rpcs: frozenset[Rpc]
    pools: frozenset[str]
    priorities: frozenset[Priority] = DEFAULT_PRIORITIES

    def allows(self, rpc: str, pool: str) -> bool:
        return rpc in self.rpcs and ("*" in self.pools or (pool != "*" and pool in self.pools))


@dataclass(frozen=True)
class Principal:
    """An authenticated caller and its grants; the engine's ``Caller``."""

    name: str
    grants: tuple[RoleGrant, ...]
    limits: Mapping[str, PrincipalLimits] = field(default_factory=dict, compare=False)

    @property
    def principal(self) -> str:
        return self.name

    def limits_for(self, pool: str) -> PrincipalLimits | None:
        """The principal's own limits on ``pool`` (``"*"`` in the policy: every pool)."""
        return self.limits.get(pool) or self.limits.get("*")

    def may(self, rpc: str, pool: str) -> bool:
        return any(g.allows(rpc, pool) for g in self.grants)

    def may_any(self, rpc: str) -> bool:
        return any(rpc in g.rpcs and g.pools for g in self.grants)

    def may_priority(self, priority: Priority) -> bool:
        """Whether a role of the principal grants this lease priority."""
        return any(priority in g.priorities for g in self.grants)

    def require(self, rpc: str, pool: str) -> None:
        if not self.may(rpc, pool):
            where = "every pool" if pool == "*" else f"pool {pool!r}"
            raise PermissionDenied(f"{self.name} may not call {rpc} on {where}")


@dataclass(frozen=True)
class TokenHash:
    """One accepted bearer token, by its SHA-256, and when it is valid (epoch seconds)."""

    sha256: str
    not_before: float = -math.inf
    not_after: float = math.inf


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    tokens: tuple[TokenHash, ...]
    mtls_cn: str


class Policy:
    """An immutable policy; reload by building a new one."""

    def __init__(self, entries: Iterable[_Entry] = ()) -> None:
        self._entries = tuple(entries)
        self._by_cn = {e.mtls_cn: e.principal for e in self._entries if e.mtls_cn}

    @property
    def has_limits(self) -> bool:
        """Whether any principal has limits of its own."""
        return any(e.principal.limits for e in self._entries)

    @classmethod
    def deny_all(cls) -> Policy:
        return cls()

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        with Path(path).open("rb") as fh:
            return cls.from_mapping(tomllib.load(fh))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Policy:
        """A policy from the parsed TOML.

        Raises:
            InvalidArgument: naming the table and key that are unknown or malformed.
        """
        _known_keys("policy", data, POLICY_KEYS)
        if not isinstance(data.get("roles", {}), Mapping):
            raise InvalidArgument("roles", "must be a table of [roles.<name>] tables")
        if not isinstance(data.get("principals", []), list):
            raise InvalidArgument("principals", "must be an array of [[principals]] tables")
        roles: dict[str, RoleGrant] = {}
        for name, role in data.get("roles", {}).items():
            _known_keys(f"roles.{name}", role, ROLE_KEYS)
            rpcs: set[Rpc] = set()
            for rpc in role.get("rpcs", []):
                if rpc in _ALIASES:
                    rpcs |= _ALIASES[rpc]
                elif rpc in KEY_BROKER_RPCS | KEY_ADMIN_RPCS:
                    rpcs.add(Rpc(rpc))
                else:
                    raise InvalidArgument(f"roles.{name}.rpcs", f"unknown RPC {rpc!r}")
            roles[name] = RoleGrant(frozenset(rpcs), frozenset(role.get("pools", [])),
                                    _priorities(name, role))
        entries, names = [], set()
        for i, p in enumerate(data.get("principals", [])):
            _known_keys(f"principals[{i}]", p, PRINCIPAL_KEYS)
            name = p.get("name", "")
            if not name or name in names:
                raise InvalidArgument(f"principals[{i}].name", "missing or repeated")
            names.add(name)
            tokens = _tokens(f"principals[{i}]", p)
            unknown = [r for r in p.get("roles", []) if r not in roles]
            if unknown:
                raise InvalidArgument(f"principals[{i}].roles", f"unknown roles {unknown}")
            grants = tuple(roles[r] for r in p.get("roles", []))
            limits = _limits(f"principals[{i}].limits", p.get("limits", {}))
            entries.append(_Entry(Principal(name, grants, limits), tokens,
                                  str(p.get("mtls_cn", ""))))
        return cls(entries)

    def by_token(self, token: str, now: float | None = None) -> Principal:
        """The principal whose token hash matches, comparing every entry in constant time.

        Raises:
            TokenExpired: the token is known but past its ``not_after``.
            TokenNotYetValid: the token is known but before its ``not_before``.
            Unauthenticated: no principal holds this token.
        """
        digest = hash_token(token)
        found: tuple[Principal, TokenHash] | None = None
        for entry in self._entries:
            for held in entry.tokens:
                if hmac.compare_digest(held.sha256, digest):
                    found = (entry.principal, held)
        if found is None:
            raise Unauthenticated("unknown bearer token")
        principal, held = found
        now = time.time() if now is None else now
        if now >= held.not_after:
            raise TokenExpired(f"bearer token of {principal.name} expired at "
                               f"{_stamp(held.not_after)}; use its successor")
        if now < held.not_before:
            raise TokenNotYetValid(f"bearer token of {principal.name} is valid from "
                                   f"{_stamp(held.not_before)}")
        return principal

    def by_certificate(self, common_name: str) -> Principal:
        principal = self._by_cn.get(common_name)
        if principal is None:
            raise Unauthenticated("client certificate names no principal")
        return principal


def _known_keys(where: str, table: Any, known: frozenset[str]) -> None:
    if not isinstance(table, Mapping):
        raise InvalidArgument(where, "must be a table")
    for key in sorted(set(table) - known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidArgument(where, f"unknown key {key!r}{hint}; known: {', '.join(sorted(known))}")


def _priorities(role_name: str, role: Mapping[str, Any]) -> frozenset[Priority]:
    """A role's ``priorities`` (``high``, ``normal``, ``low``); the default without one."""
    if "priorities" not in role:
        return DEFAULT_PRIORITIES
    names = role["priorities"]
    if not isinstance(names, list):
        raise InvalidArgument(f"roles.{role_name}.priorities",
                              'must be a list such as ["high", "normal", "low"]')
    unknown = [n for n in names if str(n).lower() not in _PRIORITIES]
    if unknown:
        raise InvalidArgument(f"roles.{role_name}.priorities",
                              f"unknown priorities {unknown}; use high, normal, low")
    return frozenset(_PRIORITIES[str(n).lower()] for n in names)


def _stamp(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _instant(where: str, value: Any) -> float:
    """A TOML date-time, or an RFC 3339 string, as epoch seconds (no offset: UTC)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidArgument(where, "must be a date-time such as 2026-12-31T00:00:00Z") from None
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        raise InvalidArgument(where, "must be a date-time such as 2026-12-31T00:00:00Z")
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def _digest(where: str, value: Any) -> str:
    digest = str(value).lower()
    if not _HEX64.fullmatch(digest):
        raise InvalidArgument(where, "must be 64 hex digits (`keybroker token new` prints one)")
    return digest


def _tokens(where: str, p: Mapping[str, Any]) -> tuple[TokenHash, ...]:
    """A principal's accepted tokens: ``token_sha256`` and each of ``tokens``."""
    out = []
    if p.get("token_sha256", ""):
        out.append(TokenHash(_digest(f"{where}.token_sha256", p["token_sha256"])))
    listed = p.get("tokens", [])
    if not isinstance(listed, list):
        raise InvalidArgument(f"{where}.tokens", "must be a list of {sha256 = ..., not_after = ...}")
    for j, t in enumerate(listed):
        at = f"{where}.tokens[{j}]"
        if not isinstance(t, Mapping):
            raise InvalidArgument(at, "must be a table such as {sha256 = ..., not_after = ...}")
        unknown = sorted(set(t) - {"sha256", "not_before", "not_after"})
        if unknown:
            raise InvalidArgument(at, f"unknown fields {unknown}; use sha256, not_before, not_after")
        lo = _instant(f"{at}.not_before", t["not_before"]) if "not_before" in t else -math.inf
        hi = _instant(f"{at}.not_after", t["not_after"]) if "not_after" in t else math.inf
        if hi <= lo:
            raise InvalidArgument(f"{at}.not_after", "must be later than not_before")
        out.append(TokenHash(_digest(f"{at}.sha256", t.get("sha256", "")), lo, hi))
    return tuple(out)


def _limits(where: str, data: Any) -> dict[str, PrincipalLimits]:
    """A principal's ``limits``: per pool, ``daily``, ``minute`` (units) and ``daily_share``."""
    if not isinstance(data, Mapping):
        raise InvalidArgument(where, "must be a table of pools, e.g. [principals.limits.free]")
    out = {}
    for pool, lim in data.items():
        at = f"{where}.{pool}"
        if not isinstance(lim, Mapping):
            raise InvalidArgument(at, "must be a table with daily, minute, daily_share")
        unknown = sorted(set(lim) - {"daily", "minute", "daily_share"})
        if unknown:
            raise InvalidArgument(at, f"unknown fields {unknown}; use daily, minute, daily_share")
        for name in ("daily", "minute"):
            v = lim.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InvalidArgument(f"{at}.{name}", "must be a whole number of units >= 0")
        share = lim.get("daily_share")
        if share is not None and (isinstance(share, bool) or not isinstance(share, int | float)
                                  or not 0.0 < share <= 1.0):
            raise InvalidArgument(f"{at}.daily_share", "must be a fraction in (0, 1]")
        out[str(pool)] = PrincipalLimits(lim.get("daily"), lim.get("minute"),
                                         None if share is None else float(share))
    return out
