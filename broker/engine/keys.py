"""The key registry: keys by id and by pool, and what a reload changes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..audit import Audit, AuditEvent
from ..errors import BrokerError, NotFound, NotReady
from ..models import Key
from ..rpcs import Rpc
from .types import KeySource, ReloadResult

if TYPE_CHECKING:
    from .healthbook import HealthBook
    from .ledger import Ledger

__all__ = ["KeyRegistry", "Pool", "ReloadDiff"]


@dataclass
class Pool:
    keys: list[Key] = field(default_factory=list)  # sorted by key_id
    accounts: dict[str, None] = field(default_factory=dict)  # distinct accounts, in key order
    serving: dict[str, list[Key]] = field(default_factory=dict)  # model -> keys, filled lazily

    def for_model(self, model: str) -> list[Key]:
        keys = self.serving.get(model)
        if keys is None:
            keys = self.keys if not model else [k for k in self.keys if k.serves(model)]
            if len(self.serving) < 1024:  # callers choose model strings: bound the cache
                self.serving[model] = keys
        return keys


@dataclass(frozen=True)
class ReloadDiff:
    """What one reload would change (``KeyRegistry.commit`` makes it so)."""

    keys: dict[str, Key]
    pools: dict[str, Pool]
    result: ReloadResult
    rotated: tuple[str, ...]  # key ids whose secret changed
    moved: tuple[tuple[Key, Key], ...]  # (old, new) of keys now under another account
    mass_removal: bool  # most of the keys known before are gone


class KeyRegistry:
    """Every loaded key, by id and by pool. Pools once seen stay known."""

    def __init__(self, source: KeySource, pool_names: Iterable[str], audit: Audit,
                 ledger: Ledger, health: HealthBook) -> None:
        self._source = source
        self._pool_names = tuple(pool_names)
        self._audit = audit
        self._ledger = ledger
        self._health = health
        self.keys: dict[str, Key] = {}
        self.pools: dict[str, Pool] = {}
        self.loaded = False
        self.load_error = ""
        """Why the last load failed (empty after a good one): what NotReady says."""

    async def reload(self, principal: str = "", rpc: Rpc | None = None) -> ReloadResult:
        """Re-read every key from the source. On failure the current keys stay in use.

        A rotated secret gets a fresh health record; a key moved to another account
        keeps what it used today of its own limits. Audited when something changed, and
        always when an operator asked (``principal``, ``rpc``).
        """
        try:
            loaded = await self._source.load()
        except BrokerError as exc:
            self.load_error = exc.message
            raise
        self.load_error = ""
        if self._unchanged(loaded):
            # The source handed back the very Key objects in force (an incremental reload
            # that found nothing new): nothing to diff, reset or rebuild, at any pool size.
            if rpc is not None:
                self._audit.record(AuditEvent.KEYS_RELOADED, decision="reloaded",
                                   principal=principal, rpc=rpc, added=0, removed=0,
                                   updated=0, total=len(self.keys))
            return ReloadResult(0, 0, 0, len(self.keys))
        diff = self.diff(loaded)
        for key_id in diff.rotated:
            await self._health.reset(diff.keys[key_id])
        for old, new in diff.moved:
            await self._ledger.carry_key_windows(old, new)
            await self._health.moved(old, new)
        result = diff.result
        if diff.mass_removal:
            self._audit.record(AuditEvent.KEYS_MASS_REMOVAL, decision="warning",
                               removed=result.removed, total=result.total,
                               reason="a reload dropped most keys")
        self.commit(diff)
        self._ledger.keys_changed()
        if result.added or result.removed or result.updated or rpc is not None:
            self._audit.record(AuditEvent.KEYS_RELOADED, decision="reloaded",
                               principal=principal, rpc=rpc or "", added=result.added,
                               removed=result.removed, updated=result.updated,
                               total=result.total)
        return result

    def _unchanged(self, loaded: list[Key]) -> bool:
        """``loaded`` is exactly the keys in force, object for object (after a first load)."""
        if not self.loaded or len(loaded) != len(self.keys):
            return False
        keys = self.keys
        return (all(keys.get(k.key_id) is k for k in loaded)
                and len({id(k) for k in loaded}) == len(loaded))

    def diff(self, loaded: Iterable[Key]) -> ReloadDiff:
        """What making ``loaded`` the key set changes."""
        new = {k.key_id: k for k in loaded}
        old = self.keys
        added = len(new.keys() - old.keys())
        removed = len(old.keys() - new.keys())
        kept = new.keys() & old.keys()
        updated = sum(1 for kid in kept if new[kid] != old[kid])
        # Pools once seen stay known: a Vault answering with fewer keys (restored empty, an
        # operator mid-rewrite) makes them exhausted, not "not found".
        pools: dict[str, Pool] = {name: Pool() for name in (*self._pool_names, *self.pools)}
        for key in sorted(new.values(), key=lambda k: k.key_id):
            pool = pools.setdefault(key.pool, Pool())
            pool.keys.append(key)
            pool.accounts[key.account] = None
        return ReloadDiff(
            keys=new, pools=pools, result=ReloadResult(added, removed, updated, len(new)),
            rotated=tuple(kid for kid in kept if new[kid].secret != old[kid].secret),
            moved=tuple((old[kid], new[kid]) for kid in kept
                        if new[kid].account != old[kid].account),
            mass_removal=bool(old) and removed > len(old) // 2)

    def commit(self, diff: ReloadDiff) -> None:
        self.keys, self.pools, self.loaded = diff.keys, diff.pools, True

    def require_ready(self) -> None:
        if not self.loaded:
            raise NotReady(f"keys are not loaded yet: {self.load_error}" if self.load_error
                           else "keys are not loaded yet")

    def pool(self, name: str) -> Pool:
        """A known pool (raises NotReady before the first load, NotFound for others)."""
        self.require_ready()
        pool = self.pools.get(name)
        if pool is None:
            raise NotFound(f"pool {name!r} not found")
        return pool

    def key(self, key_id: str) -> Key:
        """A loaded key (raises NotReady before the first load, NotFound for others)."""
        self.require_ready()
        key = self.keys.get(key_id)
        if key is None:
            raise NotFound(f"key {key_id!r} not found")
        return key
