"""request_id claims on a Redis Cluster, where the idempotency key and the leases live in
different slots and so cannot be in one script.

A request_id is claimed first on its own key (``claim.lua``: set it if absent, one more
round trip) with the lease id the first account group would grant and a deadline, 6 x the
timeout ahead by Redis's own clock (``TIME``); before each further group the claim is moved
to that group's lease id (and its deadline renewed); when no group grants, the claim is
removed. A retry that finds a claim replays the lease if it exists, waits (up to the
timeout) while the claim's deadline has not passed, and takes the claim over once it has
(its holder died). Every call of the holder ends within twice the timeout (a wait for a
connection, then the socket), so only a holder frozen for longer than the slack between
those bounds and the deadline, that then resumes, could grant that request_id a second
lease; quotas stay exact either way, since every grant is counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from ...errors import BackendUnavailable
from ...models import LeaseRecord
from ..base import Rejection, Reservation, ReserveRequest
from .layout import ttl_ms

__all__ = ["Claims"]


class Claims:
    """The claims of one store.

    Args:
        script: ``claim.lua`` registered on the store's client.
        call: the store's connection slot and error translation, entered around each call.
        get_lease: the store's lease lookup (a replay).
        timeout: the store's timeout in seconds; the holder's budget is 6 x this.
        keep_ms: how long ended leases are kept; a claim lives as long as its lease would.
    """

    def __init__(self, script: Any, call: Callable[[], AbstractAsyncContextManager[None]],
                 get_lease: Callable[[str], Awaitable[LeaseRecord | None]], *, timeout: float,
                 keep_ms: int) -> None:
        self._script = script
        self._call = call
        self._get_lease = get_lease
        self._timeout = timeout
        self._keep_ms = keep_ms
        # How long a claim stays its holder's without a new write from it: each of the
        # holder's calls may queue for a connection and then wait on the socket.
        self._budget_ms = int(timeout * 6 * 1000)

    async def _op(self, request: ReserveRequest, idem: str, lease_id: str,
                  held: str) -> tuple[str, str, bool]:
        """One claim.lua call: (the value this call now holds or '', someone else's value
        found or '', whether that one's deadline has passed)."""
        ttl = ttl_ms(request.expires_at, request.created_at, self._keep_ms / 1000)
        async with self._call():
            r = await self._script(keys=[idem], args=[lease_id, ttl, held, self._budget_ms])
        if not r:
            return "", "", False
        if len(r) == 1:
            return str(r[0]), "", False
        return "", str(r[0]), int(r[1]) == 1

    async def move(self, request: ReserveRequest, idem: str, held: str, lease_id: str) -> str:
        """Point the claim this call holds (``held``) at ``lease_id`` ('' = remove it);
        returns the value now held."""
        mine, found, _ = await self._op(request, idem, lease_id, held)
        if found:
            raise BackendUnavailable("redis store: the request_id's claim was taken over "
                                     "(this call ran past its deadline)", backend="store")
        return mine

    async def claim(self, request: ReserveRequest, idem: str,
                    lease_id: str) -> tuple[Reservation | Rejection | None, str]:
        """Claim a request_id for ``lease_id`` ('' = only look for a replay).

        Returns ``(None, value held)`` when this call may go on (holding the claim, or
        with nothing to claim), else the replay of the granted lease, or a Rejection for a
        replay-only call that found no lease. While another call holds the claim and its
        deadline (by Redis's clock) has not passed, it waits, for at most the timeout."""
        give_up = time.monotonic() + self._timeout
        held = ""
        while True:
            mine, found, stale = await self._op(request, idem, lease_id, held)
            if not found:
                return None, mine
            lease = await self._get_lease(found.partition(" ")[0])
            if lease is not None:
                return Reservation(lease=lease, used={}, replay=True), ""
            if not stale:  # its holder is at work: wait for its grant or its release
                if time.monotonic() > give_up:
                    raise BackendUnavailable(
                        "redis store: the same request_id is being reserved by another call",
                        backend="store")
                await asyncio.sleep(0.01)
                held = ""
                continue
            if not lease_id:
                return Rejection(used={}), ""  # a replay-only call: no lease to replay
            held = found  # its holder died (or its lease was pruned): take the claim over
