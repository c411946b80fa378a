"""An HTTP server that behaves like OpenRouter, for tests, ``keybroker dev`` and demos.

It follows ``openrouter-api.md``: free-model limits per *account* (20 per calendar
minute; 50 or 1000 per UTC day by credits purchased), failed attempts counted,
per-model high-demand caps, paid models limited by credits (402), OpenRouter's
error bodies and ``X-RateLimit-*`` headers (reset in epoch milliseconds),
streaming with ``: OPENROUTER PROCESSING`` comments, a usage chunk, ``[DONE]`` and
in-band errors, ``GET /api/v1/key`` (and ``/api/v1/auth/key``) and
``GET /api/v1/models``.

    async with Emulator(clock=clock) as emu:
        secret = emu.add_key("acct-a", name="a1")
        ...  # POST f"{emu.base_url}/chat/completions" with "Authorization: Bearer {secret}"
        emu.faults.failure_rate = 0.2          # 20 % of admitted calls answer 502
        emu.revoke("a1")                       # the key now answers 401

What it counts: every authenticated request for a ``:free`` model that the
limits let through is one of the account's requests today, whatever its outcome
(OpenRouter counts failed attempts). Requests refused with 401 or 429 and paid
requests are not counted. Unconfirmed details (the calendar minute, whether
``Retry-After`` comes with a 429) are constructor settings.

The keys it holds are emulator credentials; it never logs them (no access log).
"""

from __future__ import annotations

import asyncio
import difflib
import json
import math
import random
import secrets
import tomllib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from ..clock import Clock, SystemClock

__all__ = ["DEFAULT_MODELS", "Call", "EmulatedAccount", "Emulator", "Faults", "load_accounts"]

FREE_DAY_LOW = 50
FREE_DAY_HIGH = 1000
HIGH_BALANCE_CREDITS = 10.0  # credits bought (all time) that unlock FREE_DAY_HIGH
PROCESSING = b": OPENROUTER PROCESSING\n\n"
_TOOLS = ["max_tokens", "temperature", "top_p", "stop", "tools", "tool_choice"]
_PLAIN = ["max_tokens", "temperature", "top_p", "stop"]


def _model(mid: str, name: str, ctx: int, prompt: str, completion: str, params: list[str],
           provider: str, created: int) -> dict[str, Any]:
    return {
        "id": mid, "canonical_slug": mid.removesuffix(":free"), "name": name, "created": created,
        "context_length": ctx,
        "architecture": {"modality": "text->text", "input_modalities": ["text"],
                         "output_modalities": ["text"], "tokenizer": "Other"},
        "pricing": {"prompt": prompt, "completion": completion, "request": "0", "image": "0"},
        "top_provider": {"context_length": ctx, "max_completion_tokens": None,
                         "is_moderated": provider == "OpenAI"},
        "supported_parameters": list(params),
        "x_provider": provider,  # the emulator's own field: who "serves" the model
    }


DEFAULT_MODELS: tuple[dict[str, Any], ...] = (
    _model("meta-llama/llama-3.3-70b-instruct:free", "Meta: Llama 3.3 70B Instruct (free)",
           131072, "0", "0", _TOOLS, "Chutes", 1733506137),
    _model("z-ai/glm-4.5-air:free", "Z.AI: GLM 4.5 Air (free)", 131072, "0", "0", _TOOLS,
           "Z.AI", 1753471258),
    _model("deepseek/deepseek-chat-v3-0324:free", "DeepSeek: DeepSeek V3 0324 (free)", 163840,
           "0", "0", _PLAIN, "Chutes", 1742824755),
    _model("google/gemma-3-27b-it:free", "Google: Gemma 3 27B (free)", 96000, "0", "0", _PLAIN,
           "Google AI Studio", 1741756359),
    _model("meta-llama/llama-3.3-70b-instruct", "Meta: Llama 3.3 70B Instruct", 131072,
           "0.00000013", "0.0000004", _TOOLS, "DeepInfra", 1733506137),
    _model("openai/gpt-4o-mini", "OpenAI: GPT-4o-mini", 128000, "0.00000015", "0.0000006",
           _TOOLS, "OpenAI", 1721260800),
    _model("anthropic/claude-3.5-haiku", "Anthropic: Claude 3.5 Haiku", 200000, "0.0000008",
           "0.000004", _TOOLS, "Anthropic", 1730678400),
)


@dataclass
class EmulatedAccount:
    """An OpenRouter account: its keys share the free-model limits.

    Attributes:
        name: the account's name (matches the broker's ``account`` of its keys).
        credits: USD of credits bought, all time; 10 or more unlocks 1000 free requests a day.
        balance: USD left for paid models; a paid request without balance answers 402
            (``openrouter_credits``); below zero even free models answer 402.
        in_flight_budget: paid requests the account may have in flight at once; one more
            answers 402 ``in_flight_budget_exhausted`` with Retry-After (None: no limit).
        user_id: the ``user_id`` of error bodies.
    """

    name: str
    credits: float = 0.0
    balance: float = 0.0
    user_id: str = field(default_factory=lambda: "user_" + secrets.token_hex(12))
    in_flight_budget: int | None = None


@dataclass
class _Key:
    name: str
    account: str
    secret: str = field(repr=False)
    revoked: bool = False
    usage: dict[int, float] = field(default_factory=dict)  # UTC day index -> USD
    # What the management API shows and changes (``hash`` is the key's public id).
    hash: str = field(default_factory=lambda: secrets.token_hex(32))
    management: bool = False
    disabled: bool = False
    deleted: bool = False
    expires_at: float | None = None
    limit: float | None = None  # the key's own credit limit, USD per limit_reset period
    limit_reset: str | None = None  # daily | weekly | monthly | None (never)
    include_byok_in_limit: bool = False
    created_at: float = 0.0
    updated_at: float | None = None

    def dead(self, now: float) -> bool:
        """Revoked, deleted, disabled or past ``expires_at``: answers 401 everywhere."""
        return (self.revoked or self.deleted or self.disabled
                or (self.expires_at is not None and now >= self.expires_at))


@dataclass
class Faults:
    """What the emulator gets wrong on purpose; change the attributes at any time.

    Attributes:
        latency: seconds (real time) each chat completion takes before answering.
        failure_rate: share of admitted chat completions that fail with a status
            drawn from ``failure_statuses`` (408, 429 = upstream provider, 500, 502, 503).
        failure_statuses: statuses injected failures draw from.
        outage: when set, every admitted chat completion answers this status.
        stream_error_rate: share of streamed completions that break in-band after
            the first content chunk (HTTP 200, an ``error`` chunk, ``finish_reason: error``).
        unavailable_models: models answering 404 "No endpoints found".
        moderation_marker: input containing this text is flagged (403).
        chunk_delay: seconds between streamed chunks.
        processing_interval: seconds between ``: OPENROUTER PROCESSING`` comments.
        stream_error_status: the code of the in-band error chunk (429: an upstream rate
            limit after streaming began, with ``provider_name`` and ``retry_after_seconds``).
        in_flight_retry_after: Retry-After (seconds) of ``in_flight_budget_exhausted``.
        max_request_tokens: a paid request asking for more ``max_tokens`` than this answers
            402 ``weight_exceeds_budget`` (None: no such limit).
        upstream_rate_limited: model -> epoch seconds (the emulator's clock) until which its
            upstream provider answers 429 (``Provider returned error``, ``provider_name``,
            ``retry_after_seconds``, ``headers.Retry-After``; no X-RateLimit headers).
        budgets: key name -> a spent 403 budget: ``{"limit_source": ...,
            "resets_at": epoch seconds, "scope": ..., "limit_usd": ..., "spend_usd": ...}``;
            it lifts by itself at ``resets_at``.
    """

    latency: float = 0.0
    failure_rate: float = 0.0
    failure_statuses: tuple[int, ...] = (502,)
    outage: int | None = None
    stream_error_rate: float = 0.0
    unavailable_models: set[str] = field(default_factory=set)
    moderation_marker: str = "[[flag-me]]"
    chunk_delay: float = 0.0
    processing_interval: float = 0.5
    stream_error_status: int = 502
    in_flight_retry_after: int = 1
    max_request_tokens: int | None = None
    upstream_rate_limited: dict[str, float] = field(default_factory=dict)
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Call:
    """One chat completion the emulator answered (no secret: the key's name)."""

    key: str
    account: str
    model: str
    status: int
    stream: bool
    counted: bool
    at: float


class _Refused(Exception):
    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response


def _json(status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json",
                        headers=headers)


def _error(status: int, message: str, metadata: dict[str, Any] | None = None,
           user_id: str = "", headers: Mapping[str, str] | None = None) -> web.Response:
    """OpenRouter's error body; the HTTP status equals ``error.code``."""
    err: dict[str, Any] = {"message": message, "code": status}
    if metadata is not None:
        err["metadata"] = metadata
    body: dict[str, Any] = {"error": err}
    if user_id:
        body["user_id"] = user_id
    return _json(status, body, headers)


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


class Emulator:
    """An OpenRouter look-alike on ``host:port`` (port 0 picks a free one).

    Args:
        accounts: accounts to start with (add more with ``add_account``/``add_key``).
        clock: time for the day and minute windows, ``created`` and resets (tests pass
            a ManualClock and cross 00:00 UTC); latency and chunk delays are real time.
        models: the catalog ``GET /api/v1/models`` serves; defaults to DEFAULT_MODELS.
        minute_limit: free requests per account per calendar minute.
        model_rpm: per-model "high demand" caps, requests per minute over all accounts.
        retry_after: also send ``Retry-After`` (seconds) on 429 and 503 (unconfirmed
            whether OpenRouter does; off by default).
        limit_source: add ``metadata.limit_source`` and ``metadata.error_type`` to
            platform 429 bodies, as newer OpenRouter answers do.
        seed: seed for injected failures, so a test run is repeatable.
    """

    def __init__(self, accounts: Iterable[EmulatedAccount] = (), *, clock: Clock | None = None,
                 host: str = "127.0.0.1", port: int = 0,
                 models: Sequence[Mapping[str, Any]] | None = None, minute_limit: int = 20,
                 model_rpm: Mapping[str, int] | None = None, retry_after: bool = False,
                 limit_source: bool = False, seed: int | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self.host, self.port = host, port
        self.models = [dict(m) for m in (DEFAULT_MODELS if models is None else models)]
        self.minute_limit = minute_limit
        self.model_rpm = dict(model_rpm or {})
        self.retry_after = retry_after
        self.limit_source = limit_source
        self.faults = Faults()
        self.calls: list[Call] = []
        self.accounts: dict[str, EmulatedAccount] = {a.name: a for a in accounts}
        self._keys: dict[str, _Key] = {}  # secret -> key
        self._rng = random.Random(seed)
        self._day: dict[str, tuple[int, int]] = {}  # account -> (day index, free requests)
        self._minute: dict[str, tuple[int, int]] = {}  # account -> (minute index, requests)
        self._model_minute: dict[str, tuple[int, int]] = {}  # model -> (minute index, requests)
        self._rpm_ids = {m: str(uuid.uuid4()) for m in self.model_rpm}
        self._in_flight: dict[str, int] = {}  # account -> paid requests being answered
        self.peak_in_flight: dict[str, int] = {}  # account -> most paid requests at once
        self.management_failures = 0
        """The next this many management API calls answer 500 (a provider fault)."""
        self._runner: web.AppRunner | None = None

    # -- control (the Python API tests use) -----------------------------------------------

    def add_account(self, name: str, *, credits: float = 0.0,
                    balance: float = 0.0) -> EmulatedAccount:
        """Add (or replace the settings of) an account."""
        account = self.accounts.get(name)
        if account is None:
            account = self.accounts[name] = EmulatedAccount(name, credits, balance)
        else:
            account.credits, account.balance = credits, balance
        return account

    def add_key(self, account: str, secret: str | None = None, *, name: str = "") -> str:
        """Add a key to ``account`` (created when new); returns the secret."""
        if account not in self.accounts:
            self.add_account(account)
        secret = secret or "sk-or-v1-" + secrets.token_hex(32)
        name = name or f"{account}-{len([k for k in self._keys.values() if k.account == account]) + 1}"
        if any(k.name == name for k in self._keys.values()):
            raise ValueError(f"key name {name!r} is taken")
        self._keys[secret] = _Key(name, account, secret, created_at=self.clock.now())
        return secret

    def set_key_limit(self, key: str, limit: float | None,
                      limit_reset: str | None = None) -> None:
        """Give a key (by name or secret) its own credit limit in USD per ``limit_reset``
        period (daily, weekly, monthly; None: never resets); ``limit=None`` removes it."""
        k = self._key(key)
        k.limit, k.limit_reset = limit, limit_reset

    def key_limit_remaining(self, key: str) -> float | None:
        """USD left of a key's credit limit in its current period (None: no limit)."""
        k = self._key(key)
        return None if k.limit is None else max(0.0, k.limit - self._period_usage(k))

    def _period_usage(self, k: _Key) -> float:
        day = self._day_index()
        if k.limit_reset == "daily":
            start = day
        elif k.limit_reset == "weekly":
            start = day - (day + 3) % 7
        elif k.limit_reset == "monthly":
            start = _month_start(day)
        else:
            start = 0
        return sum((v for d, v in k.usage.items() if d >= start), 0.0)

    def add_management_key(self, account: str, secret: str | None = None) -> str:
        """Add a management key to ``account``: it may call ``/api/v1/keys`` (that account's
        keys only) and nothing else. Returns the secret."""
        if account not in self.accounts:
            self.add_account(account)
        secret = secret or "sk-or-v1-" + secrets.token_hex(32)
        self._keys[secret] = _Key(f"{account}-management-{len(self._keys) + 1}", account,
                                  secret, management=True, created_at=self.clock.now())
        return secret

    def live_keys(self, account: str) -> list[str]:
        """Names of the account's normal keys that would answer a chat completion now."""
        now = self.clock.now()
        return sorted(k.name for k in self._keys.values()
                      if k.account == account and not k.management and not k.dead(now))

    def is_live(self, secret: str) -> bool:
        """Whether this secret would be accepted for a chat completion now."""
        key = self._keys.get(secret)
        return key is not None and not key.management and not key.dead(self.clock.now())

    def revoke(self, key: str) -> None:
        """Revoke a key (by name or secret): it answers 401 from now on."""
        self._key(key).revoked = True

    def restore(self, key: str) -> None:
        """Undo ``revoke``."""
        self._key(key).revoked = False

    def use(self, account: str, requests: int) -> None:
        """Count ``requests`` free-model requests made today outside the broker's view."""
        self._bump(self._day, account, self._day_index(), requests)

    def free_requests_today(self, account: str) -> int:
        """Free-model requests counted today for ``account`` (what /key reports as used)."""
        return self._count(self._day, account, self._day_index())

    def free_daily_limit(self, account: str) -> int:
        acct = self.accounts[account]
        return FREE_DAY_HIGH if acct.credits >= HIGH_BALANCE_CREDITS else FREE_DAY_LOW

    def calls_with(self, key: str) -> list[Call]:
        """The chat completions made with one key (by name or secret)."""
        name = self._key(key).name
        return [c for c in self.calls if c.key == name]

    def _key(self, key: str) -> _Key:
        found = self._keys.get(key) or next((k for k in self._keys.values() if k.name == key),
                                            None)
        if found is None:
            raise KeyError("no such key")  # never echo the argument: it may be a secret
        return found

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/api/v1``: what keys' ``base_url`` should say."""
        return f"http://{self.host}:{self.port}/api/v1"

    async def start(self) -> Emulator:
        app = web.Application()
        app.router.add_post("/api/v1/chat/completions", self._chat)
        app.router.add_get("/api/v1/key", self._key_info)
        app.router.add_get("/api/v1/auth/key", self._key_info)
        app.router.add_get("/api/v1/models", self._models)
        app.router.add_get("/api/v1/keys", self._mgmt_list)
        app.router.add_post("/api/v1/keys", self._mgmt_create)
        app.router.add_get("/api/v1/keys/{hash}", self._mgmt_get)
        app.router.add_patch("/api/v1/keys/{hash}", self._mgmt_patch)
        app.router.add_delete("/api/v1/keys/{hash}", self._mgmt_delete)
        app.router.add_get("/_emulator/accounts", self._admin_accounts)
        app.router.add_post("/_emulator/faults", self._admin_faults)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Emulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- windows ----------------------------------------------------------------------------

    def _day_index(self) -> int:
        return int(self.clock.now() // 86400)

    def _minute_index(self) -> int:
        return int(self.clock.now() // 60)

    @staticmethod
    def _count(table: dict[str, tuple[int, int]], name: str, index: int) -> int:
        at, count = table.get(name, (index, 0))
        return count if at == index else 0

    def _bump(self, table: dict[str, tuple[int, int]], name: str, index: int, n: int = 1) -> None:
        table[name] = (index, self._count(table, name, index) + n)

    def _rate_limited(self, message: str, limit: int, reset_s: float, source: str,
                      user_id: str) -> web.Response:
        values = {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": "0",
                  "X-RateLimit-Reset": str(int(reset_s * 1000))}
        metadata: dict[str, Any] = {"headers": dict(values), "provider_name": None}
        if self.limit_source and source:
            metadata |= {"limit_source": source, "error_type": "rate_limit_exceeded"}
        headers = dict(values)
        if self.retry_after:
            headers["Retry-After"] = str(max(1, int(reset_s - self.clock.now() + 0.999)))
        return _error(429, message, metadata, user_id, headers)

    def _admit_free(self, account: EmulatedAccount, model: str) -> None:
        """Charge one free request to the account, or raise _Refused with OpenRouter's 429."""
        day, minute = self._day_index(), self._minute_index()
        daily = self.free_daily_limit(account.name)
        if self._count(self._day, account.name, day) >= daily:
            message = ("Rate limit exceeded: free-models-per-day-high-balance. "
                       if daily == FREE_DAY_HIGH else
                       "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 "
                       "free model requests per day")
            raise _Refused(self._rate_limited(message, daily, (day + 1) * 86400.0,
                                              "openrouter_free_tier_daily", account.user_id))
        if self._count(self._minute, account.name, minute) >= self.minute_limit:
            raise _Refused(self._rate_limited(
                "Rate limit exceeded: free-models-per-min. ", self.minute_limit,
                (minute + 1) * 60.0, "openrouter_free_tier_minute", account.user_id))
        cap = self.model_rpm.get(model)
        if cap is not None and self._count(self._model_minute, model, minute) >= cap:
            slug = model.removesuffix(":free")
            raise _Refused(self._rate_limited(
                f"Rate limit exceeded: limit_rpm/{slug}/{self._rpm_ids[model]}. High demand for "
                f"{model} on OpenRouter - limited to {cap} requests per minute. Please retry "
                "shortly.", cap, (minute + 1) * 60.0, "openrouter_shared_capacity",
                account.user_id))
        self._bump(self._day, account.name, day)
        self._bump(self._minute, account.name, minute)
        if cap is not None:
            self._bump(self._model_minute, model, minute)

    # -- handlers ---------------------------------------------------------------------------

    def _bearer_key(self, request: web.Request) -> _Key:
        """The live key the request's bearer token names, or _Refused with 401."""
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not token:
            raise _Refused(_error(401, "No auth credentials found"))
        key = self._keys.get(token)
        if key is None or key.dead(self.clock.now()):
            raise _Refused(_error(401, "User not found."))
        return key

    def _authenticate(self, request: web.Request) -> _Key:
        key = self._bearer_key(request)
        if key.management:  # a management key authenticates only /api/v1/keys
            raise _Refused(_error(401, "Management keys cannot be used for this endpoint"))
        return key

    def _find_model(self, model_id: str) -> dict[str, Any] | None:
        return next((m for m in self.models if m["id"] == model_id), None)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            key = self._authenticate(request)
        except _Refused as refused:
            return refused.response
        account = self.accounts[key.account]
        uid = account.user_id
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return _error(400, "Invalid JSON body", user_id=uid)
        wanted = [m for m in [body.get("model"), *(body.get("models") or [])]
                  if isinstance(m, str) and m]
        if not wanted:
            return _error(400, "No models provided", user_id=uid)
        model = next((self._find_model(m) for m in wanted if self._find_model(m)), None)
        if model is None:
            return _error(400, f"{wanted[0]} is not a valid model ID", user_id=uid)
        mid: str = model["id"]
        stream = bool(body.get("stream"))
        free = mid.endswith(":free")
        try:
            self._check_budgets(key, account, body, mid, free)
            if free:
                self._admit_free(account, mid)
        except _Refused as refused:
            self._log(key, mid, refused.response.status, stream, counted=False)
            return refused.response
        if not free:
            self._in_flight[account.name] = self._in_flight.get(account.name, 0) + 1
            self.peak_in_flight[account.name] = max(self.peak_in_flight.get(account.name, 0),
                                                    self._in_flight[account.name])
            try:
                return await self._admitted(request, key, account, body, model, stream, free)
            finally:
                self._in_flight[account.name] -= 1
        return await self._admitted(request, key, account, body, model, stream, free)

    def _check_budgets(self, key: _Key, account: EmulatedAccount, body: dict[str, Any],
                       mid: str, free: bool) -> None:
        """The credit limits and budgets, in OpenRouter's order; raises _Refused."""
        uid, f, now = account.user_id, self.faults, self.clock.now()
        budget = f.budgets.get(key.name)
        if budget is not None:
            resets_at = float(budget.get("resets_at", 0))
            if now < resets_at:
                iso = datetime.fromtimestamp(resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                source = str(budget.get("limit_source", "openrouter_guardrail_budget"))
                raise _Refused(_error(403, "Budget limit exceeded", {
                    "limit_source": source, "scope": budget.get("scope", "key"),
                    "limit_usd": budget.get("limit_usd", 1.0),
                    "spend_usd": budget.get("spend_usd", 1.0), "resets_at": iso}, uid))
            del f.budgets[key.name]
        if account.balance < 0 or (not free and account.balance <= 0):
            never = ("This account never purchased credits. Make sure your key is on the "
                     "correct account or org, and if so, purchase more at "
                     "https://openrouter.ai/settings/credits" if account.credits <= 0 else
                     "Add more using https://openrouter.ai/settings/credits")
            raise _Refused(_error(402, f"Insufficient credits. {never}",
                                  {"limit_source": "openrouter_credits"}, uid))
        if free:
            return
        if key.limit is not None and self._period_usage(key) >= key.limit:
            raise _Refused(_error(402, "Key limit exceeded: this key's credit limit is spent. "
                                       "Raise it at https://openrouter.ai/settings/keys",
                                  {"limit_source": "openrouter_key_limit",
                                   "limit_reset": key.limit_reset}, uid))
        tokens = body.get("max_tokens")
        if (f.max_request_tokens is not None and isinstance(tokens, int)
                and tokens > f.max_request_tokens):
            raise _Refused(_error(402, "weight_exceeds_budget: this request's estimated cost "
                                       "exceeds the in-flight budget; reduce max_tokens",
                                  {"limit_source": "openrouter_credits",
                                   "reason": "weight_exceeds_budget"}, uid))
        cap = account.in_flight_budget
        if cap is not None and self._in_flight.get(account.name, 0) >= cap:
            wait = f.in_flight_retry_after
            raise _Refused(_error(402, "in_flight_budget_exhausted: too many paid requests in "
                                       "flight for this balance; retry shortly",
                                  {"limit_source": "openrouter_in_flight_budget",
                                   "reason": "in_flight_budget_exhausted"}, uid,
                                  {"Retry-After": str(wait)}))

    async def _admitted(self, request: web.Request, key: _Key, account: EmulatedAccount,
                        body: dict[str, Any], model: dict[str, Any], stream: bool,
                        free: bool) -> web.StreamResponse:
        mid: str = model["id"]
        uid = account.user_id
        # Admitted: from here on a free request counts, whatever happens (failed attempts do).
        status, response = self._outcome(body, model, uid)
        if response is not None:
            await asyncio.sleep(self.faults.latency)
            self._log(key, mid, status, stream, counted=free)
            return response
        if stream:
            return await self._stream(request, key, body, model, free)
        await asyncio.sleep(self.faults.latency)
        completion = self._completion(key, account, body, model)
        self._log(key, mid, 200, stream, counted=free)
        return _json(200, completion)

    def _outcome(self, body: dict[str, Any], model: dict[str, Any],
                 uid: str) -> tuple[int, web.Response | None]:
        """An injected or request-caused failure of an admitted call, else (200, None)."""
        mid, provider = model["id"], model.get("x_provider", "Emulated")
        f = self.faults
        limited = f.upstream_rate_limited.get(mid)
        if limited is not None:
            wait = limited - self.clock.now()
            if wait > 0:
                seconds = max(1, math.ceil(wait))
                return 429, _error(429, "Provider returned error", {
                    "raw": f"{mid} is temporarily rate-limited upstream. Please retry shortly, "
                           "or add your own key to accumulate your rate limits.",
                    "provider_name": provider, "is_byok": False,
                    "retry_after_seconds": seconds,
                    "headers": {"Retry-After": str(seconds)}}, uid)
            del f.upstream_rate_limited[mid]
        if mid in f.unavailable_models:
            return 404, _error(404, f"No endpoints found for {mid}.", user_id=uid)
        if body.get("tools") and "tools" not in model["supported_parameters"]:
            return 404, _error(404, "No endpoints found that support tool use. To learn more "
                                    "about provider routing, visit: "
                                    "https://openrouter.ai/docs/provider-routing", user_id=uid)
        text = json.dumps(body.get("messages", []))
        if f.moderation_marker and f.moderation_marker in text:
            return 403, _error(403, f"{mid} requires moderation on {provider}. Your input was "
                                    'flagged for "harassment". No credits were charged.',
                               {"reasons": ["harassment"], "flagged_input": text[:100],
                                "provider_name": provider, "model_slug": mid}, uid)
        status = f.outage
        if status is None and f.failure_rate and self._rng.random() < f.failure_rate:
            status = self._rng.choice(f.failure_statuses)
        if status is None:
            return 200, None
        return status, self._failure(status, mid, provider, uid)

    def _failure(self, status: int, mid: str, provider: str, uid: str) -> web.Response:
        headers = {"Retry-After": "1"} if self.retry_after and status in (429, 503) else None
        if status == 408:
            return _error(408, "Operation timed out. Please try again later.", user_id=uid)
        if status == 429:  # the upstream provider's limit, not OpenRouter's
            return _error(429, "Provider returned error", {
                "raw": f"{mid} is temporarily rate-limited upstream. Please retry shortly.",
                "provider_name": provider}, uid, headers)
        if status == 502:
            return _error(502, "Provider returned error", {
                "raw": "upstream connect error or disconnect/reset before headers",
                "provider_name": provider}, uid)
        if status == 503:
            return _error(503, "Service temporarily unavailable", user_id=uid, headers=headers)
        return _error(status, "Internal Server Error", user_id=uid)

    def _answer(self, body: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
        """Content, finish reason, token counts and cost of one completion."""
        messages = body.get("messages") or []
        prompt_tokens = sum(4 + len(json.dumps(m)) // 4 for m in messages) or 1
        max_tokens = body.get("max_tokens")
        words = ["This", "is", "an", "emulated", "answer", "from", model["id"], "-", "no",
                 "model", "was", "run."]
        finish = "stop"
        if isinstance(max_tokens, int) and 0 < max_tokens < len(words):
            words, finish = words[:max_tokens], "length"
        choice = body.get("tool_choice")
        tool_calls = None
        if body.get("tools") and (choice == "required" or isinstance(choice, dict)):
            tools = body["tools"]
            name = (choice.get("function", {}).get("name") if isinstance(choice, dict)
                    else None) or tools[0].get("function", {}).get("name", "tool")
            tool_calls = [{"id": "call_" + secrets.token_hex(8), "type": "function",
                           "function": {"name": name, "arguments": "{}"}}]
            words, finish = [], "tool_calls"
        completion_tokens = len(words) + (8 if tool_calls else 0)
        price = model["pricing"]
        cost = (prompt_tokens * float(price["prompt"]) + completion_tokens
                * float(price["completion"]) + float(price.get("request", 0)))
        return {"words": words, "finish": finish, "tool_calls": tool_calls,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens,
                          "cost": round(cost, 10)}}

    def _charge(self, key: _Key, account: EmulatedAccount, cost: float) -> None:
        day = self._day_index()
        key.usage[day] = key.usage.get(day, 0.0) + cost
        account.balance -= cost

    def _envelope(self, model: dict[str, Any], gen_id: str, obj: str) -> dict[str, Any]:
        return {"id": gen_id, "provider": model.get("x_provider", "Emulated"),
                "model": model["id"], "object": obj, "created": int(self.clock.now())}

    def _gen_id(self) -> str:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
        return f"gen-{int(self.clock.now())}-" + "".join(secrets.choice(alphabet)
                                                        for _ in range(20))

    def _completion(self, key: _Key, account: EmulatedAccount, body: dict[str, Any],
                    model: dict[str, Any]) -> dict[str, Any]:
        answer = self._answer(body, model)
        self._charge(key, account, answer["usage"]["cost"])
        message: dict[str, Any] = {"role": "assistant", "content": " ".join(answer["words"])}
        if answer["tool_calls"]:
            message = {"role": "assistant", "content": "", "tool_calls": answer["tool_calls"]}
        return self._envelope(model, self._gen_id(), "chat.completion") | {
            "choices": [{"index": 0, "finish_reason": answer["finish"],
                         "native_finish_reason": answer["finish"], "message": message}],
            "usage": answer["usage"]}

    async def _stream(self, request: web.Request, key: _Key, body: dict[str, Any],
                      model: dict[str, Any], counted: bool) -> web.StreamResponse:
        account = self.accounts[key.account]
        resp = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        f = self.faults
        broken = bool(f.stream_error_rate) and self._rng.random() < f.stream_error_rate
        self._log(key, model["id"], 200, True, counted=counted, in_band_error=broken)
        try:
            await resp.write(PROCESSING)
            waited = 0.0
            while waited < f.latency:  # OpenRouter keeps the connection alive while it waits
                step = min(f.processing_interval, f.latency - waited)
                await asyncio.sleep(step)
                waited += step
                await resp.write(PROCESSING)
            answer = self._answer(body, model)
            gen_id = self._gen_id()
            head = self._envelope(model, gen_id, "chat.completion.chunk")
            words = answer["words"] or [""]
            for i, word in enumerate(words):
                delta: dict[str, Any] = {"role": "assistant",
                                         "content": word if i == 0 else " " + word}
                if answer["tool_calls"]:
                    delta = {"role": "assistant", "content": "",
                             "tool_calls": answer["tool_calls"]}
                await resp.write(_sse(head | {"choices": [{
                    "index": 0, "delta": delta, "finish_reason": None,
                    "native_finish_reason": None, "logprobs": None}]}))
                if broken:
                    await resp.write(_sse(head | {
                        "error": self._in_band_error(model),
                        "choices": [{"index": 0, "delta": {"content": ""},
                                     "finish_reason": "error"}]}))
                    await resp.write_eof()
                    return resp
                if f.chunk_delay:
                    await asyncio.sleep(f.chunk_delay)
            self._charge(key, account, answer["usage"]["cost"])
            await resp.write(_sse(head | {"choices": [{
                "index": 0, "delta": {"role": "assistant", "content": ""},
                "finish_reason": answer["finish"], "native_finish_reason": answer["finish"],
                "logprobs": None}]}))
            await resp.write(_sse(head | {"choices": [], "usage": answer["usage"]}))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the caller went away mid-stream; the request still counted
        return resp

    def _in_band_error(self, model: dict[str, Any]) -> dict[str, Any]:
        code = self.faults.stream_error_status
        if code == 429:
            return {"code": 429, "message": "Provider returned error", "metadata": {
                "raw": f"{model['id']} is temporarily rate-limited upstream.",
                "provider_name": model.get("x_provider", "Emulated"), "is_byok": False,
                "retry_after_seconds": 1, "headers": {"Retry-After": "1"}}}
        return {"code": code, "message": "Provider disconnected unexpectedly"}

    def _log(self, key: _Key, model: str, status: int, stream: bool, *, counted: bool,
             in_band_error: bool = False) -> None:
        code = self.faults.stream_error_status if in_band_error else status
        self.calls.append(Call(key.name, key.account, model, code, stream, counted,
                               self.clock.now()))

    async def _key_info(self, request: web.Request) -> web.StreamResponse:
        try:
            key = self._authenticate(request)
        except _Refused as refused:
            return refused.response
        account = self.accounts[key.account]
        day = self._day_index()
        used = self.free_requests_today(account.name)
        limit = self.free_daily_limit(account.name)
        week_start = day - (day + 3) % 7  # 1970-01-01 was a Thursday; weeks start on Monday
        month = _month_start(day)
        secret = key.secret
        return _json(200, {"data": {
            "label": f"{secret[:12]}...{secret[-3:]}", "limit": key.limit,
            "limit_remaining": (None if key.limit is None else
                                round(max(0.0, key.limit - self._period_usage(key)), 10)),
            "limit_reset": key.limit_reset, "include_byok_in_limit": False,
            "usage": round(sum(key.usage.values(), 0.0), 10),
            "usage_daily": round(key.usage.get(day, 0.0), 10),
            "usage_weekly": round(sum((v for d, v in key.usage.items() if d >= week_start), 0.0),
                                  10),
            "usage_monthly": round(sum((v for d, v in key.usage.items() if d >= month), 0.0), 10),
            "byok_usage": 0, "is_free_tier": account.credits <= 0, "is_management_key": False,
            "expires_at": None,
            "free_model_daily_requests": {"used": used, "limit": limit,
                                          "remaining": max(0, limit - used)},
            "rate_limit": {"requests": -1, "interval": "10s",
                           "note": "This field is deprecated and safe to ignore."}}})

    async def _models(self, request: web.Request) -> web.StreamResponse:
        wanted = [p for p in request.query.get("supported_parameters", "").split(",") if p]
        data = [{k: v for k, v in m.items() if not k.startswith("x_")} for m in self.models
                if all(p in m["supported_parameters"] for p in wanted)]
        return _json(200, {"data": data})

    async def _admin_accounts(self, request: web.Request) -> web.StreamResponse:
        """Today's free-request counts per account, and each key's state (never a secret)."""
        return _json(200, {"accounts": [
            {"name": a.name, "credits": a.credits, "balance": round(a.balance, 10),
             "free_requests_today": self.free_requests_today(a.name),
             "free_daily_limit": self.free_daily_limit(a.name),
             "keys": [{"name": k.name, "revoked": k.revoked} for k in self._keys.values()
                      if k.account == a.name]}
            for a in self.accounts.values()]})

    async def _admin_faults(self, request: web.Request) -> web.StreamResponse:
        """Set fault fields from a JSON object, e.g. {"failure_rate": 0.1, "outage": 503};
        {"revoke": "<key name>"} revokes a key; {"key_limit": {"key": name, "limit": USD,
        "limit_reset": "daily"}} sets a key's credit limit; {"account": {"name": ...,
        "balance": USD, "in_flight_budget": N}} changes an account."""
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("not an object")
            if "revoke" in body:
                self.revoke(str(body.pop("revoke")))
            if "key_limit" in body:
                kl = dict(body.pop("key_limit"))
                self.set_key_limit(str(kl["key"]), None if kl.get("limit") is None
                                   else float(kl["limit"]), kl.get("limit_reset"))
            if "account" in body:
                ac = dict(body.pop("account"))
                acct = self.accounts[str(ac["name"])]
                if "balance" in ac:
                    acct.balance = float(ac["balance"])
                if "in_flight_budget" in ac:
                    v = ac["in_flight_budget"]
                    acct.in_flight_budget = None if v is None else int(v)
            for name, value in body.items():
                if name not in Faults.__dataclass_fields__:
                    raise ValueError(f"unknown fault {name!r}")
                if name == "failure_statuses":
                    value = tuple(int(v) for v in value)
                elif name == "unavailable_models":
                    value = set(value)
                elif name == "upstream_rate_limited":
                    value = {str(m): float(t) for m, t in dict(value).items()}
                elif name == "budgets":
                    value = {str(k): dict(v) for k, v in dict(value).items()}
                setattr(self.faults, name, value)
        except (ValueError, KeyError, TypeError) as exc:
            return _json(400, {"error": {"code": 400, "message": str(exc)}})
        return _json(200, {"faults": {k: sorted(v) if isinstance(v, set) else v
                                      for k, v in self.faults.__dict__.items()}})

    # -- management API (/api/v1/keys) ------------------------------------------------------

    def _manager(self, request: web.Request) -> _Key:
        """The management key of the request, or _Refused with 401 (a normal key is refused)."""
        key = self._bearer_key(request)
        if not key.management:
            raise _Refused(_error(401, "Only management keys can perform this operation"))
        if self.management_failures > 0:
            self.management_failures -= 1
            raise _Refused(_error(500, "Internal Server Error"))
        return key

    def _managed(self, request: web.Request) -> tuple[_Key, _Key]:
        """(management key, the account's key named by ``{hash}``), or _Refused (401/404)."""
        manager = self._manager(request)
        wanted = request.match_info["hash"]
        key = next((k for k in self._keys.values() if k.hash == wanted and not k.deleted
                    and not k.management and k.account == manager.account), None)
        if key is None:
            raise _Refused(_error(404, "Key not found"))
        return manager, key

    @staticmethod
    def _iso(at: float | None) -> str | None:
        if at is None:
            return None
        from datetime import UTC, datetime

        return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    def _key_object(self, key: _Key) -> dict[str, Any]:
        """OpenRouter's KeyObject: the key's hash, masked label and usage; never the secret."""
        day = self._day_index()
        week_start = day - (day + 3) % 7
        month = _month_start(day)
        usage = round(sum(key.usage.values(), 0.0), 10)
        return {
            "hash": key.hash, "name": key.name, "label": f"{key.secret[:11]}...{key.secret[-4:]}",
            "disabled": key.disabled, "limit": key.limit,
            "limit_remaining": None if key.limit is None else max(0.0, key.limit - usage),
            "limit_reset": key.limit_reset, "include_byok_in_limit": key.include_byok_in_limit,
            "usage": usage, "usage_daily": round(key.usage.get(day, 0.0), 10),
            "usage_weekly": round(sum((v for d, v in key.usage.items() if d >= week_start),
                                      0.0), 10),
            "usage_monthly": round(sum((v for d, v in key.usage.items() if d >= month), 0.0),
                                   10),
            "byok_usage": 0, "byok_usage_daily": 0, "byok_usage_weekly": 0,
            "byok_usage_monthly": 0, "created_at": self._iso(key.created_at),
            "updated_at": self._iso(key.updated_at), "expires_at": self._iso(key.expires_at)}

    @staticmethod
    def _key_fields(body: Any, *, creating: bool) -> dict[str, Any]:
        """Validated fields of a create or update body; ValueError names the bad one."""
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        allowed = {"name", "limit", "limit_reset", "include_byok_in_limit"} | (
            {"expires_at"} if creating else {"disabled"})
        unknown = set(body) - allowed
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
        out: dict[str, Any] = {}
        if "name" in body or creating:
            name = body.get("name")
            if not isinstance(name, str) or not name.strip():
                raise ValueError("name is required")
            out["name"] = name
        if "limit" in body:
            limit = body["limit"]
            if limit is not None and (isinstance(limit, bool)
                                      or not isinstance(limit, int | float) or limit < 0):
                raise ValueError("limit must be a non-negative number or null")
            out["limit"] = None if limit is None else float(limit)
        if "limit_reset" in body:
            if body["limit_reset"] not in (None, "daily", "weekly", "monthly"):
                raise ValueError("limit_reset must be daily, weekly, monthly or null")
            out["limit_reset"] = body["limit_reset"]
        for flag in ("include_byok_in_limit", "disabled"):
            if flag in body:
                if not isinstance(body[flag], bool):
                    raise ValueError(f"{flag} must be a boolean")
                out[flag] = body[flag]
        if body.get("expires_at") is not None:
            from datetime import datetime

            text = body["expires_at"]
            if not isinstance(text, str) or not text.endswith("Z"):
                raise ValueError("expires_at must be an ISO 8601 time in UTC ending in Z")
            try:
                out["expires_at"] = datetime.fromisoformat(text[:-1] + "+00:00").timestamp()
            except ValueError:
                raise ValueError("expires_at must be an ISO 8601 time in UTC ending in Z") \
                    from None
        return out

    async def _mgmt_list(self, request: web.Request) -> web.StreamResponse:
        try:
            manager = self._manager(request)
            offset = int(request.query.get("offset", "0"))
            if offset < 0:
                raise ValueError
        except _Refused as refused:
            return refused.response
        except ValueError:
            return _error(400, "offset must be a non-negative integer")
        with_disabled = request.query.get("include_disabled", "false").lower() == "true"
        keys = [k for k in self._keys.values() if k.account == manager.account
                and not k.management and not k.deleted and (with_disabled or not k.disabled)]
        keys.sort(key=lambda k: k.created_at)  # stable: creation order within one instant
        return _json(200, {"data": [self._key_object(k) for k in keys[offset:offset + 100]]})

    async def _mgmt_create(self, request: web.Request) -> web.StreamResponse:
        try:
            manager = self._manager(request)
            fields = self._key_fields(await request.json(), creating=True)
        except _Refused as refused:
            return refused.response
        except ValueError as exc:
            return _error(400, str(exc))
        secret = "sk-or-v1-" + secrets.token_hex(32)
        key = _Key(fields.pop("name"), manager.account, secret, created_at=self.clock.now())
        for name, value in fields.items():
            setattr(key, name, value)
        self._keys[secret] = key
        return _json(201, {"data": self._key_object(key), "key": secret})

    async def _mgmt_get(self, request: web.Request) -> web.StreamResponse:
        try:
            _, key = self._managed(request)
        except _Refused as refused:
            return refused.response
        return _json(200, {"data": self._key_object(key)})

    async def _mgmt_patch(self, request: web.Request) -> web.StreamResponse:
        try:
            _, key = self._managed(request)
            fields = self._key_fields(await request.json(), creating=False)
        except _Refused as refused:
            return refused.response
        except ValueError as exc:
            return _error(400, str(exc))
        for name, value in fields.items():
            setattr(key, name, value)
        key.updated_at = self.clock.now()
        return _json(200, {"data": self._key_object(key)})

    async def _mgmt_delete(self, request: web.Request) -> web.StreamResponse:
        try:
            _, key = self._managed(request)
        except _Refused as refused:
            return refused.response
        key.deleted = True
        return _json(200, {"deleted": True})


def _month_start(day: int) -> int:
    d = datetime.fromtimestamp(day * 86400, UTC)
    return int(d.replace(day=1).timestamp() // 86400)


def _only(path: str | Path, where: str, table: Any, known: set[str]) -> None:
    if not isinstance(table, dict):
        raise ValueError(f"{path}: {where}: must be a table")
    for key in sorted(set(table) - known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{path}: {where}: unknown key {key!r}{hint}")


def load_accounts(path: str | Path) -> list[tuple[EmulatedAccount, list[tuple[str, str]]]]:
    """Accounts and their keys from a TOML file::

        [accounts.acct-a]
        credits = 0            # USD bought, all time (>= 10: 1000 free requests a day)
        balance = 0.0          # USD left for paid models (below 0: free models fail too)
        in_flight_budget = 8   # optional: paid requests in flight at once
        keys = { a1 = "sk-or-v1-...", a2 = "sk-or-v1-..." }   # name = secret

    Returns [(account, [(key name, secret), ...]), ...].

    Raises:
        ValueError: the file is not TOML, or has a table or key other than these (a
            misspelt ``[acounts.x]`` would otherwise give an emulator without accounts).
    """
    try:
        with Path(path).open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    _only(path, "top level", data, {"accounts"})
    if not isinstance(data.get("accounts"), dict) or not data["accounts"]:
        raise ValueError(f"{path}: no [accounts.<name>] table")
    out = []
    for name, table in data["accounts"].items():
        _only(path, f"[accounts.{name}]", table, {"credits", "balance", "keys", "in_flight_budget"})
        if not isinstance(table.get("keys", {}), dict):
            raise ValueError(f"{path}: [accounts.{name}]: keys must be a table name = secret")
        budget = table.get("in_flight_budget")
        account = EmulatedAccount(name, float(table.get("credits", 0)),
                                  float(table.get("balance", 0)),
                                  in_flight_budget=None if budget is None else int(budget))
        keys = [(str(k), str(v)) for k, v in dict(table.get("keys", {})).items()]
        out.append((account, keys))
    return out
