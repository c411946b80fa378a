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
    name = "batch-svc"
    mtls_cn = "batch-svc.internal"    # client certificate subject CN (needs tls.client_ca_file)
    roles = ["consumer"]

Tokens are kept only as SHA-256 hashes and compared in constant time. Anything
not granted is denied. High priority (which may spend the reserve and skips pacing) is a
grant too: only a role that lists ``"high"`` in ``priorities`` may ask for it.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidArgument, PermissionDenied, Unauthenticated
from .models import Priority
from .rpcs import KEY_ADMIN_RPCS, KEY_BROKER_RPCS, Rpc

__all__ = ["DEFAULT_PRIORITIES", "PRINCIPAL_KEYS", "ROLE_KEYS", "Policy", "Principal", "RoleGrant",
           "hash_token", "new_token", "parse_bearer"]

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
PRINCIPAL_KEYS = frozenset({"name", "token_sha256", "mtls_cn", "roles"})
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
    if scheme.lower() != "bearer" or not _TOKEN.fullmatch(token.strip()):
        raise Unauthenticated("malformed authorization header; expected 'Bearer <token>'")
    return token.strip()


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

    @property
    def principal(self) -> str:
        return self.name

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
class _Entry:
    principal: Principal
    token_sha256: str
    mtls_cn: str


class Policy:
    """An immutable policy; reload by building a new one."""

    def __init__(self, entries: Iterable[_Entry] = ()) -> None:
        self._entries = tuple(entries)
        self._by_cn = {e.mtls_cn: e.principal for e in self._entries if e.mtls_cn}

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
            digest = str(p.get("token_sha256", "")).lower()
            if digest and not _HEX64.fullmatch(digest):
                raise InvalidArgument(f"principals[{i}].token_sha256", "must be 64 hex digits")
            unknown = [r for r in p.get("roles", []) if r not in roles]
            if unknown:
                raise InvalidArgument(f"principals[{i}].roles", f"unknown roles {unknown}")
            grants = tuple(roles[r] for r in p.get("roles", []))
            entries.append(_Entry(Principal(name, grants), digest, str(p.get("mtls_cn", ""))))
        return cls(entries)

    def by_token(self, token: str) -> Principal:
        """The principal whose token hash matches, comparing every entry in constant time."""
        digest = hash_token(token)
        found: Principal | None = None
        for entry in self._entries:
            if entry.token_sha256 and hmac.compare_digest(entry.token_sha256, digest):
                found = entry.principal
        if found is None:
            raise Unauthenticated("unknown bearer token")
        return found

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
