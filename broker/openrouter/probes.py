"""Key probes: ``GET <base_url>/key`` per key on an interval, off the lease path.

OpenRouter answers ``/key`` without spending quota. A 401 means the key is
invalid or revoked: the engine disables it (reason ``probe_401``) before a caller
is handed it. A 200 carries ``free_model_daily_requests`` (used, limit,
remaining), which reconciles the account's day counter with the provider's, and the
key's own credit limit (``limit``, ``limit_remaining``, ``limit_reset``): a key cooling
because its limit was spent is released when credit is left, else cooled until the
limit's next reset (for ever, when it never resets).
Rounds are jittered (``openrouter.probe_jitter``) and at most
``openrouter.probe_concurrency`` probes are in flight. Keys disabled in Vault are
not probed, nor is a key whose ``base_url`` is not in ``openrouter.allowed_base_urls``
(the key source does not load those; this is the second lock on the same door); a
provider without ``/key`` answers 404, which is ignored.

The secret goes only into the ``Authorization`` header: logs name the key id.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import structlog

from ..clock import Clock
from ..config import OpenRouterSettings, normalize_base_url
from ..errors import BrokerError
from ..models import Key

__all__ = ["CreditLimit", "KeyProber", "ProbeResult", "parse_credit_limit", "parse_key_info"]

log = structlog.get_logger("keybroker.openrouter")


class ProbeSink(Protocol):
    """Where probe answers go (LeaseEngine.apply_probe)."""

    async def apply_probe(self, key_id: str, status: int, daily_limit: int | None,
                          daily_remaining: int | None, *,
                          observed_at: float | None = None,
                          credit_limit: CreditLimit | None = None) -> None: ...


@dataclass(frozen=True)
class CreditLimit:
    """A key's own credit limit as ``GET /key`` reports it (USD)."""

    limit: float | None
    remaining: float | None
    reset: str | None  # daily | weekly | monthly | None (never)


def parse_credit_limit(body: Any) -> CreditLimit | None:
    """``data.limit``, ``data.limit_remaining``, ``data.limit_reset``; None when malformed."""
    try:
        data = body["data"]
        limit, remaining, reset = data.get("limit"), data.get("limit_remaining"), \
            data.get("limit_reset")
    except (KeyError, TypeError, AttributeError):
        return None

    def usd(v: Any) -> float | None:
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    return CreditLimit(usd(limit), usd(remaining), reset if isinstance(reset, str) else None)


@dataclass(frozen=True)
class ProbeResult:
    key_id: str
    status: int  # 0: no answer
    daily_limit: int | None = None
    daily_remaining: int | None = None


def parse_key_info(body: Any) -> tuple[int | None, int | None]:
    """(limit, remaining) of ``data.free_model_daily_requests``; Nones when absent."""
    try:
        free = body["data"]["free_model_daily_requests"]
        limit, remaining = free.get("limit"), free.get("remaining")
    except (KeyError, TypeError, AttributeError):
        return None, None
    ok = [isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (limit, remaining)]
    return (limit if ok[0] else None), (remaining if ok[1] and ok[0] else None)


class KeyProber:
    """Probes every enabled key each round and hands the answers to the engine.

    Args:
        sink: the engine (``apply_probe``).
        keys: the keys loaded last (a callable, so reloads are seen).
        ready: whether keys have been loaded; rounds start once it is true.
        settings: the ``[openrouter]`` settings.
        clock: time of each observation (a probe answer about a day that ended is dropped).
    """

    def __init__(self, sink: ProbeSink, keys: Callable[[], Sequence[Key]],
                 settings: OpenRouterSettings, clock: Clock, *,
                 ready: Callable[[], bool] = lambda: True, http: httpx.AsyncClient | None = None,
                 rng: random.Random | None = None,
                 on_error: Callable[[BrokerError], None] | None = None) -> None:
        """``on_error`` hears each store error a probe round handled (the broker counts it)."""
        self._sink = sink
        self._on_error = on_error
        self._keys = keys
        self._ready = ready
        self._settings = settings
        self._clock = clock
        self._http = http
        self._own_http = http is None
        self._rng = rng or random.Random()
        self._allowed = frozenset(normalize_base_url(u) for u in settings.allowed_base_urls)

    async def run(self) -> None:
        """Probe rounds forever, ``probe_interval`` apart (jittered); cancel to stop."""
        while not self._ready():
            await asyncio.sleep(0.05)
        while True:
            await self.probe_all()
            j = self._settings.probe_jitter
            await asyncio.sleep(self._settings.probe_interval * (1.0 + self._rng.uniform(-j, j)))

    async def probe_all(self) -> list[ProbeResult]:
        """One round over every enabled key (bounded concurrency)."""
        gate = asyncio.Semaphore(self._settings.probe_concurrency)
        keys = [k for k in self._keys() if k.enabled and self._may_probe(k)]

        async def one(key: Key) -> ProbeResult:
            async with gate:
                return await self.probe(key)

        return list(await asyncio.gather(*(one(k) for k in keys)))

    def _may_probe(self, key: Key) -> bool:
        if normalize_base_url(key.base_url) in self._allowed:
            return True
        log.warning("probe.skipped", key_id=key.key_id, reason="base_url not allowed")
        return False

    async def probe(self, key: Key) -> ProbeResult:
        """Probe one key and apply the answer; never raises for provider or store trouble."""
        if not self._may_probe(key):
            return ProbeResult(key.key_id, 0)
        if self._http is None:
            self._http = httpx.AsyncClient()
        observed = self._clock.now()
        try:
            resp = await self._http.get(
                key.base_url.rstrip("/") + "/key", timeout=self._settings.probe_timeout,
                headers={"Authorization": f"Bearer {key.secret.reveal()}"})
        except httpx.HTTPError as exc:
            log.info("probe.failed", key_id=key.key_id, error=type(exc).__name__)
            return ProbeResult(key.key_id, 0)
        limit = remaining = None
        credit: CreditLimit | None = None
        if resp.status_code == 200:
            try:
                body = resp.json()
                limit, remaining = parse_key_info(body)
                credit = parse_credit_limit(body)
            except ValueError:
                log.info("probe.malformed", key_id=key.key_id)
        elif resp.status_code == 401:
            log.warning("probe.key_rejected", key_id=key.key_id, status=401)
        result = ProbeResult(key.key_id, resp.status_code, limit, remaining)
        try:
            await self._sink.apply_probe(key.key_id, resp.status_code, limit, remaining,
                                         observed_at=observed, credit_limit=credit)
        except BrokerError as exc:
            if self._on_error is not None:
                self._on_error(exc)
            log.warning("probe.apply_failed", key_id=key.key_id, error=exc.message)
        return result

    async def aclose(self) -> None:
        if self._own_http and self._http is not None:
            await self._http.aclose()
