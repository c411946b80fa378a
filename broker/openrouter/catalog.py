"""The provider's model catalog (``GET <base_url>/models``), cached, and ``model="auto"``.

``ModelCatalog`` implements the engine's ``ModelChooser``: for a pool it reads the
catalog of the pool's keys' ``base_url`` (cached for ``openrouter.catalog_ttl``;
a stale copy is served while a fresh one is fetched in the background) and picks
by the pool's ``model_policy``:

- ``free_first``: a free model (``:free``, or priced 0) if one fits, else the cheapest;
- ``cheapest``: the lowest prompt + completion price;
- ``allowlist``: the first model of ``model_allowlist`` that fits.

A model fits when its context length is at least ``min_context``, it supports
every one of ``required_parameters`` (e.g. ``tools``), it is on
``model_allowlist`` when that is set, and one of the usable keys serves it (keys
restricted to models are respected). Ties go to the longer context, then the id.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from ..clock import Clock
from ..config import ModelPolicy, PoolSettings, Settings
from ..errors import BackendUnavailable, BrokerError, InvalidArgument
from ..models import Key

__all__ = ["ModelCatalog", "ModelInfo", "choose_model", "parse_models"]

log = structlog.get_logger("keybroker.openrouter")


@dataclass(frozen=True)
class ModelInfo:
    """What the chooser needs of one catalog entry."""

    id: str
    context_length: int
    prompt_price: float  # USD per token
    completion_price: float
    supported_parameters: frozenset[str]

    @property
    def free(self) -> bool:
        return self.id.endswith(":free") or self.price == 0.0

    @property
    def price(self) -> float:
        return self.prompt_price + self.completion_price


def _price(value: Any) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        return math.inf  # unknown price: never "cheapest"
    return p if math.isfinite(p) and p >= 0 else math.inf


def parse_models(body: Any) -> list[ModelInfo]:
    """``{"data": [Model, ...]}`` -> ModelInfo list; malformed entries are skipped."""
    data = body.get("data") if isinstance(body, Mapping) else None
    out = []
    for m in data if isinstance(data, list) else []:
        if not isinstance(m, Mapping) or not isinstance(m.get("id"), str):
            continue
        pricing = m.get("pricing")
        pricing = pricing if isinstance(pricing, Mapping) else {}
        params = m.get("supported_parameters")
        ctx = m.get("context_length")
        out.append(ModelInfo(
            id=m["id"], context_length=ctx if isinstance(ctx, int) else 0,
            prompt_price=_price(pricing.get("prompt")),
            completion_price=_price(pricing.get("completion")),
            supported_parameters=frozenset(p for p in params if isinstance(p, str))
            if isinstance(params, list) else frozenset()))
    return out


def choose_model(models: Sequence[ModelInfo], policy: PoolSettings,
                 keys: Sequence[Key]) -> str | None:
    """The model ``policy`` picks among ``models`` that ``keys`` serve; None when none fits."""
    allow = policy.model_allowlist
    required = set(policy.required_parameters)
    fits = [m for m in models
            if m.context_length >= policy.min_context and required <= m.supported_parameters
            and (not allow or m.id in allow) and any(k.serves(m.id) for k in keys)]
    if not fits:
        return None
    if policy.model_policy is ModelPolicy.ALLOWLIST:
        return min(fits, key=lambda m: allow.index(m.id)).id
    if policy.model_policy is ModelPolicy.CHEAPEST:
        return min(fits, key=lambda m: (m.price, -m.context_length, m.id)).id
    return min(fits, key=lambda m: (not m.free, m.price, -m.context_length, m.id)).id


@dataclass
class _Cached:
    models: list[ModelInfo]
    fetched_at: float


class ModelCatalog:
    """Fetches and caches catalogs per base URL; the engine's ModelChooser."""

    def __init__(self, settings: Settings, clock: Clock, *,
                 http: httpx.AsyncClient | None = None,
                 on_error: Callable[[BrokerError], None] | None = None) -> None:
        """``on_error`` hears each failed background refresh (a lease's own fetch raises)."""
        self._settings = settings
        self._on_error = on_error
        self._clock = clock
        self._http = http
        self._own_http = http is None
        self._cache: dict[str, _Cached] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}

    async def choose(self, pool: str, keys: Sequence[Key],
                     avoid: frozenset[str] = frozenset()) -> str:
        """The model for ``model="auto"`` on ``pool`` (see the module docstring), other than
        a model in ``avoid`` (cooling pool-wide after an upstream 429) while another fits."""
        if not keys:
            raise InvalidArgument("model", f"pool {pool!r} has no key to pick a model for")
        base_url = keys[0].base_url
        models = await self.models(base_url)
        policy = self._settings.pool(pool)
        serving = [k for k in keys if k.base_url == base_url]
        chosen = None
        if avoid:
            chosen = choose_model([m for m in models if m.id not in avoid], policy, serving)
        if chosen is None:
            chosen = choose_model(models, policy, serving)
        if chosen is None:
            raise InvalidArgument("model", f"no model in the catalog fits pool {pool!r} "
                                           f"(policy {policy.model_policy.value})")
        return chosen

    async def models(self, base_url: str) -> list[ModelInfo]:
        """The catalog of ``base_url``: cached; stale copies are refreshed in the background."""
        cached = self._cache.get(base_url)
        if cached is not None:
            if self._clock.now() - cached.fetched_at >= self._settings.openrouter.catalog_ttl:
                self._refresh_later(base_url)
            return cached.models
        lock = self._locks.setdefault(base_url, asyncio.Lock())
        async with lock:  # one fetch per base URL, however many leases wait for it
            cached = self._cache.get(base_url)
            if cached is None:
                cached = await self._fetch(base_url)
            return cached.models

    def _refresh_later(self, base_url: str) -> None:
        task = self._refreshing.get(base_url)
        if task is not None and not task.done():
            return

        async def refresh() -> None:
            try:
                await self._fetch(base_url)
            except BackendUnavailable as exc:
                if self._on_error is not None:
                    self._on_error(exc)
                log.warning("catalog.refresh_failed", base_url=base_url, error=exc.message)

        self._refreshing[base_url] = asyncio.create_task(refresh())

    async def _fetch(self, base_url: str) -> _Cached:
        if self._http is None:
            self._http = httpx.AsyncClient()
        url = base_url.rstrip("/") + "/models"
        try:
            resp = await self._http.get(url, timeout=self._settings.openrouter.catalog_timeout)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"model catalog unreachable ({type(exc).__name__})",
                                     backend="catalog") from None
        if resp.status_code != 200:
            raise BackendUnavailable(f"model catalog answered HTTP {resp.status_code}",
                                     backend="catalog")
        try:
            models = parse_models(resp.json())
        except ValueError:
            raise BackendUnavailable("model catalog answered malformed JSON", backend="catalog") from None
        cached = self._cache[base_url] = _Cached(models, self._clock.now())
        log.info("catalog.loaded", base_url=base_url, models=len(models))
        return cached

    async def aclose(self) -> None:
        for task in self._refreshing.values():
            task.cancel()
        for task in self._refreshing.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._own_http and self._http is not None:
            await self._http.aclose()
