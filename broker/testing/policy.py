"""Build policy files (see :mod:`broker.auth` for the format) in code, for tests and dev stacks.

    text = (PolicyBuilder()
            .role("consumer", rpcs=["KeyBroker/*"], pools=["free"])
            .principal("billing-svc", token, roles=["consumer"])
            .to_toml())

Tokens are written only as their SHA-256 (``token_sha256``), like ``keybroker token
new`` prints them; a principal may instead carry a ready digest or an mTLS CN, several
tokens with validity times (``tokens=[Token(...), ...]``) and limits of its own per pool::

    PolicyBuilder().role("consumer", ["KeyBroker/*"], ["free"]).principal(
        "batch", roles=["consumer"],
        tokens=[Token(old, not_after=cutover), Token(new, not_before=cutover - 3600)],
        limits={"free": PrincipalLimits(daily=500, minute=20)})
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..auth import hash_token
from ..models import PrincipalLimits

__all__ = ["PolicyBuilder", "Token"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _string(value: str) -> str:
    # A JSON string is a valid TOML basic string for everything a policy holds.
    return json.dumps(value)


def _strings(values: Iterable[str]) -> str:
    return "[" + ", ".join(_string(v) for v in values) + "]"


@dataclass(frozen=True)
class Token:
    """One of a principal's bearer tokens (``token`` in clear or a ready ``sha256``), valid
    from ``not_before`` until ``not_after`` (epoch seconds; infinite: unbounded)."""

    token: str | None = None
    not_before: float = -math.inf
    not_after: float = math.inf
    sha256: str = ""

    def toml(self) -> str:
        digest = self.sha256 or hash_token(self.token or "")
        parts = [f"sha256 = {_string(digest)}"]
        for name in ("not_before", "not_after"):
            when = getattr(self, name)
            if math.isfinite(when):
                stamp = datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z")
                parts.append(f"{name} = {stamp}")
        return "{" + ", ".join(parts) + "}"


@dataclass(frozen=True)
class _Principal:
    name: str
    token_sha256: str
    mtls_cn: str
    roles: tuple[str, ...]
    tokens: tuple[Token, ...] = ()
    limits: tuple[tuple[str, PrincipalLimits], ...] = ()


class PolicyBuilder:
    """Roles and principals added in order; :meth:`to_toml` renders the policy file text.

    Each method returns the builder, so calls chain. The text has roles first, then
    principals, so two builders' texts concatenated are one valid policy too.
    """

    def __init__(self) -> None:
        self._roles: dict[str, tuple[tuple[str, ...], tuple[str, ...],
                                     tuple[str, ...] | None]] = {}
        self._principals: list[_Principal] = []

    def role(self, name: str, rpcs: Iterable[str], pools: Iterable[str],
             priorities: Iterable[str] | None = None) -> PolicyBuilder:
        """Add a role granting ``rpcs`` (names, ``"*"`` or ``"KeyBroker/*"``) on ``pools``,
        at lease ``priorities`` (None: the policy's default, normal and low)."""
        if name in self._roles:
            raise ValueError(f"role {name!r} added twice")
        self._roles[name] = (tuple(rpcs), tuple(pools),
                             None if priorities is None else tuple(priorities))
        return self

    def principal(self, name: str, token: str | None = None, roles: Iterable[str] = (), *,
                  token_sha256: str = "", mtls_cn: str = "", tokens: Iterable[Token] = (),
                  limits: Mapping[str, PrincipalLimits] | None = None) -> PolicyBuilder:
        """Add a principal known by a bearer ``token`` (stored hashed), a ready
        ``token_sha256``, several ``tokens`` with validity times, or a client certificate CN
        ``mtls_cn``; ``limits`` per pool (``"*"``: every pool) bound what it may lease."""
        if token is not None:
            if token_sha256:
                raise ValueError("give a token or its token_sha256, not both")
            token_sha256 = hash_token(token)
        self._principals.append(_Principal(name, token_sha256, mtls_cn, tuple(roles),
                                           tuple(tokens), tuple((limits or {}).items())))
        return self

    def to_toml(self) -> str:
        """The policy file text."""
        blocks = []
        for name, (rpcs, pools, priorities) in self._roles.items():
            key = name if _BARE_KEY.fullmatch(name) else _string(name)
            block = f"[roles.{key}]\nrpcs = {_strings(rpcs)}\npools = {_strings(pools)}\n"
            if priorities is not None:
                block += f"priorities = {_strings(priorities)}\n"
            blocks.append(block)
        for p in self._principals:
            lines = ["[[principals]]", f"name = {_string(p.name)}"]
            if p.token_sha256:
                lines.append(f"token_sha256 = {_string(p.token_sha256)}")
            if p.mtls_cn:
                lines.append(f"mtls_cn = {_string(p.mtls_cn)}")
            lines.append(f"roles = {_strings(p.roles)}")
            if p.tokens:
                lines.append("tokens = [" + ", ".join(t.toml() for t in p.tokens) + "]")
            for pool, lim in p.limits:
                lines.append(f"[principals.limits.{_string(pool)}]")
                for field in ("daily", "minute", "daily_share"):
                    value = getattr(lim, field)
                    if value is not None:
                        lines.append(f"{field} = {value!r}")
            blocks.append("\n".join(lines) + "\n")
        return "\n".join(blocks)

    def write(self, path: str | Path) -> Path:
        """Write :meth:`to_toml` to ``path`` and return it as a Path."""
        out = Path(path)
        out.write_text(self.to_toml(), encoding="utf-8")
        return out
