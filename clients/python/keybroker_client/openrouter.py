"""Chat completions on OpenRouter with leased keys: lease -> POST -> ReportUsage -> Complete.

    async with AsyncKeyBrokerClient(BROKER, token=TOKEN) as broker:
        router = OpenRouterClient(broker, pool="free", allow_internal=True)
        try:
            result = await router.chat([{"role": "user", "content": "hi"}],
                                       model="meta-llama/llama-3.3-70b-instruct:free")
            print(result.content)
        except RouteInternal as internal:
            ...  # no key now (internal.reason, internal.retry_after): use your own model

Each attempt leases a key, calls ``{base_url}/chat/completions`` with httpx,
reports status, tokens, cost, latency, ``X-RateLimit-*`` and ``Retry-After`` to
the broker and completes the lease. A 429, 401, 402, 408, 5xx, timeout or
connection error fails over to a new lease (the broker steers it away from the
key or account that failed), up to ``max_attempts`` provider calls and within
``deadline`` seconds. Caller faults (400, 403 moderation, 404, 413, 422) are
raised at once: another key would get the same answer (but a 403 whose
``limit_source`` names a spent guardrail, workspace or key budget fails over).

Budgets and upstream limits: every report carries the error body's reason,
``metadata.limit_source``, the upstream ``provider_name`` and ``resets_at``, so the
broker cools the right thing (the account's paid use, the key, the model). A 402
``weight_exceeds_budget`` is raised at once (the request itself is too big; another
key would get the same answer). A 429 from the model's upstream provider (``Provider
returned error`` with ``provider_name``, no X-RateLimit headers) switches MODEL, not
account: to the next model of the caller's ``models=[...]`` fallback list, or, with
``model="auto"``, to what the broker picks next (it avoids models cooling pool-wide);
without a fallback the broker refuses the model until its cooldown ends and its
RetryInfo is waited as below. A stream's in-band error chunk is reported as that error.

Waiting: ``Retry-After`` on a 429/503/5xx is slept (when at most ``max_wait``)
before the next attempt; an account that answered 429 with ``X-RateLimit-Reset``
is not called again before that time, even if a lease lands on it again; when
the broker has no key (``QuotaExhausted``) its ``retry_after`` is slept when at
most ``max_wait`` and within the deadline, else the error is raised.

The INTERNAL route is surfaced as the exception ``RouteInternal`` (with
``allow_internal=True``): the caller's own model takes over. Without
``allow_internal`` an exhausted pool raises ``QuotaExhausted``.

Every lease the client takes is completed on every way out of an attempt: an
answer, a connection error or timeout, any exception, a cancellation (the
completion is shielded from it and the cancellation re-raised afterwards),
KeyboardInterrupt in the sync client, and leaving a stream's block. Arguments
the client can check (required fields, a body JSON can encode) are checked
before a lease is taken.

Every attempt that got a decision reports it before completing: the provider's
status, or ``http_status=0`` with ``error_type`` ``connection`` or ``timeout``
when no answer came, so the key's circuit learns of dead endpoints. An attempt
cut short by the caller (an exception, a cancellation) has no answer to report:
its lease is completed without one.

Complete's ``used`` follows what the provider counted: false (a refund) when the
request never left (nothing was sent: connection refused, a cancellation during
the connect), the key was refused (401) or the platform's rate limit refused the
call (a 429 with ``X-RateLimit-*``); true otherwise, failed attempts included,
because OpenRouter counts them, and whenever the request may have reached the
provider. Whether it was sent is read from httpcore's ``trace`` events; a
transport that emits none counts as sent unless it failed to connect. One exception to
"report, then complete": the refunded 429 with ``X-RateLimit-Remaining`` is
completed first, so the reconcile its report triggers sets the broker's count
last (the broker accepts a report on a lease its caller completed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from ._client import AsyncKeyBrokerClient, KeyBrokerClient, Lease, _shielded
from ._errors import QuotaExhausted

__all__ = [
    "Attempt",
    "ChatResult",
    "ChatStream",
    "OpenRouterClient",
    "OpenRouterError",
    "RouteInternal",
    "SyncChatStream",
    "SyncOpenRouterClient",
]

_FAILOVER = frozenset({401, 402, 408, 429})  # plus every 5xx and 0 (no response)


class RouteInternal(Exception):
    """The broker routed the request INTERNAL: use your own model.

    Attributes:
        reason: ``quota_exhausted``, ``reserved_for_higher_priority``,
            ``all_keys_unhealthy`` or ``pacing``.
        retry_after: seconds until an external key is expected to be available.
    """

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(f"routed internally ({reason}); retry in {retry_after:.0f}s")
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class Attempt:
    """One provider call (never the key's secret)."""

    key_id: str
    account: str
    status: int  # HTTP status; 0 when no response arrived
    error_type: str
    latency_ms: int


class OpenRouterError(Exception):
    """The provider's last answer when no attempt succeeded (or a caller fault).

    Attributes:
        status: HTTP status (or the in-band error code of a stream); 0: no response.
        message: ``error.message`` from the body.
        metadata: ``error.metadata`` from the body.
        error_type: a short class: ``rate_limited``, ``invalid_key``, ``no_credits``,
            ``timeout``, ``connection``, ``provider_error``, ``bad_request``, ...
        attempts: every provider call made for this request.
    """

    def __init__(self, status: int, message: str, *, error_type: str = "",
                 metadata: Mapping[str, Any] | None = None,
                 attempts: Sequence[Attempt] = ()) -> None:
        super().__init__(f"OpenRouter {status or 'no response'}: {message}")
        self.status = status
        self.message = message
        self.error_type = error_type
        self.metadata = dict(metadata or {})
        self.attempts = list(attempts)


@dataclass
class ChatResult:
    """A successful completion.

    Attributes:
        data: the completion body (for a stream: one assembled from its chunks).
        key_id, account: the key that served it (never its secret).
        attempts: every provider call made, the successful one last.
    """

    data: dict[str, Any]
    key_id: str
    account: str
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def content(self) -> str:
        choices = self.data.get("choices") or [{}]
        return str((choices[0].get("message") or {}).get("content") or "")

    @property
    def model(self) -> str:
        return str(self.data.get("model", ""))

    @property
    def usage(self) -> dict[str, Any]:
        return dict(self.data.get("usage") or {})


# -- what a provider answer means (shared by the async and sync clients) ----------------------

@dataclass
class _Answer:
    status: int
    latency_ms: int
    error_type: str = ""
    message: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    remaining: int | None = None
    reset_ms: int | None = None
    retry_after: float | None = None
    sent: bool = True
    error_reason: str = ""
    limit_source: str = ""
    upstream_provider: str = ""
    resets_at: float | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def upstream_limited(self) -> bool:
        """A 429 from the model's upstream provider (the model is saturated for everyone)."""
        return self.status == 429 and self.reset_ms is None and bool(
            self.upstream_provider or self.limit_source == "upstream_provider_shared_pool")

    @property
    def failover(self) -> bool:
        if self.error_reason == "weight_exceeds_budget":
            return False  # this request is too big for any key: the caller must shrink it
        if self.status == 403 and self.limit_source in _BUDGET_SOURCES:
            return True  # this key's (or its workspace's) budget is spent until resets_at
        return self.status in _FAILOVER or self.status >= 500 or self.status == 0

    @property
    def reconciles(self) -> bool:
        """A platform 429 carrying the provider's count: the report resets the broker's."""
        return self.status == 429 and self.remaining is not None

    @property
    def used(self) -> bool:
        """Whether the provider counted the call (see the module docstring)."""
        return self.sent and not (self.status == 401 or self.reconciles)

    def report(self, model: str) -> dict[str, Any]:
        usage = self.body.get("usage") or {}
        fields: dict[str, Any] = {
            "error_type": self.error_type[:128], "latency_ms": max(0, self.latency_ms),
            "prompt_tokens": _int(usage.get("prompt_tokens")),
            "completion_tokens": _int(usage.get("completion_tokens")),
            "cost": _cost(usage.get("cost")), "model": str(self.body.get("model") or model)[:256],
            "ratelimit_limit": self.limit, "ratelimit_remaining": self.remaining,
            "ratelimit_reset_ms": self.reset_ms, "retry_after": self.retry_after,
            "error_reason": self.error_reason[:128], "limit_source": self.limit_source[:128],
            "upstream_provider": self.upstream_provider[:128], "resets_at": self.resets_at}
        return {k: v for k, v in fields.items() if v is not None and v != ""}

    def error(self, attempts: Sequence[Attempt]) -> OpenRouterError:
        return OpenRouterError(self.status, self.message or f"HTTP {self.status}",
                               error_type=self.error_type, metadata=self.metadata,
                               attempts=attempts)


def _int(v: Any) -> int:
    return int(v) if isinstance(v, int | float) and math.isfinite(v) and v > 0 else 0


def _cost(v: Any) -> float:
    try:
        c = float(v)
    except (TypeError, ValueError):
        return 0.0
    return c if math.isfinite(c) and c > 0 else 0.0


def _header_int(headers: httpx.Headers, name: str) -> int | None:
    try:
        return int(headers[name])
    except (KeyError, ValueError):
        return None


def _retry_after(headers: httpx.Headers, now: float) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), 7 * 86400.0)


_REASONS = ("in_flight_budget_exhausted", "weight_exceeds_budget")
_BUDGET_SOURCES = frozenset({"openrouter_guardrail_budget", "openrouter_workspace_budget",
                             "openrouter_key_limit"})


def _reason(err: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """The provider's error reason: ``metadata.reason``, a string ``error.code``, or a known
    reason named in the message."""
    for v in (meta.get("reason"), err.get("code")):
        if isinstance(v, str) and v:
            return v
    message = str(err.get("message", ""))
    return next((r for r in _REASONS if r in message), "")


def _resets_at(v: Any) -> float | None:
    """``metadata.resets_at``: ISO 8601 (``...Z``) or epoch seconds/milliseconds."""
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
        return v / 1000.0 if v > 1e11 else float(v)
    if isinstance(v, str) and v:
        try:
            from datetime import datetime

            return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _meta_retry_after(meta: Mapping[str, Any]) -> float | None:
    """``metadata.retry_after_seconds``, else ``metadata.headers["Retry-After"]``."""
    v = meta.get("retry_after_seconds")
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
        return min(float(v), 7 * 86400.0)
    headers = meta.get("headers")
    if isinstance(headers, dict):
        h = httpx.Headers({str(k): str(x) for k, x in headers.items()})
        return _retry_after(h, time.time())
    return None


def _provider_fields(answer: _Answer, err: Mapping[str, Any]) -> None:
    """Fill the reason, limit source, upstream provider, resets_at and a body-only
    Retry-After of an error answer from its body."""
    meta = answer.metadata
    answer.error_reason = _reason(err, meta)
    source = meta.get("limit_source")
    answer.limit_source = source if isinstance(source, str) else ""
    provider = meta.get("provider_name")
    answer.upstream_provider = provider if isinstance(provider, str) else ""
    answer.resets_at = _resets_at(meta.get("resets_at"))
    if answer.retry_after is None:
        answer.retry_after = _meta_retry_after(meta)


def _error_type(status: int, body: Mapping[str, Any]) -> str:
    err = body.get("error")
    meta = err.get("metadata") if isinstance(err, dict) else None
    if isinstance(meta, dict) and meta.get("error_type"):
        return str(meta["error_type"])
    if status == 402 and isinstance(err, dict):
        return _reason(err, meta if isinstance(meta, dict) else {}) or "no_credits"
    if status == 429:
        return "rate_limited" if isinstance(meta, dict) and "headers" in meta else \
            "upstream_rate_limited"
    return {400: "bad_request", 401: "invalid_key", 402: "no_credits", 403: "moderation",
            404: "no_endpoints", 408: "timeout", 413: "too_large", 422: "unprocessable",
            502: "provider_error", 503: "unavailable"}.get(status, "" if status < 400 else
                                                           "server_error")


def _answer(status: int, headers: httpx.Headers, raw: bytes, latency_ms: int,
            now: float) -> _Answer:
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    err = body.get("error")
    err = err if isinstance(err, dict) else {}
    meta = err.get("metadata")
    answer = _Answer(status=status, latency_ms=latency_ms, body=body if status < 300 else {},
                     error_type="" if status < 300 else _error_type(status, body),
                     message=str(err.get("message", "")),
                     metadata=meta if isinstance(meta, dict) else {},
                     retry_after=_retry_after(headers, now))
    answer.limit = _header_int(headers, "x-ratelimit-limit")
    answer.remaining = _header_int(headers, "x-ratelimit-remaining")
    answer.reset_ms = _header_int(headers, "x-ratelimit-reset")
    if answer.remaining is None and isinstance(answer.metadata.get("headers"), dict):
        # Some answers carry the values only in the body's metadata.headers.
        h = httpx.Headers({str(k): str(v) for k, v in answer.metadata["headers"].items()})
        answer.limit = _header_int(h, "x-ratelimit-limit")
        answer.remaining = _header_int(h, "x-ratelimit-remaining")
        answer.reset_ms = _header_int(h, "x-ratelimit-reset")
    if status >= 400:
        _provider_fields(answer, err)
    return answer


class _Trace:
    """Whether one request may have reached the provider, told by httpcore's ``trace``
    extension: once its headers started to go out, it may have."""

    def __init__(self) -> None:
        self.started = False  # the transport reported anything (a connect, a send)
        self.sent = False

    def _note(self, name: str) -> None:
        self.started = True
        if name.endswith(".send_request_headers.started"):
            self.sent = True

    def hook(self, name: str, info: Mapping[str, Any]) -> None:
        self._note(name)

    async def ahook(self, name: str, info: Mapping[str, Any]) -> None:
        self._note(name)

    def may_have_sent(self, exc: BaseException) -> bool:
        """Whether an attempt that ended with ``exc`` may have reached the provider."""
        if self.started:
            return self.sent
        # No connection was made (or none could be): the request never left.
        return not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout
                              | httpx.UnsupportedProtocol | httpx.InvalidURL)


def _no_response(exc: httpx.TransportError, latency_ms: int, trace: _Trace) -> _Answer:
    timeout = isinstance(exc, httpx.TimeoutException)
    return _Answer(status=0, latency_ms=latency_ms, error_type="timeout" if timeout else
                   "connection", message=type(exc).__name__, sent=trace.may_have_sent(exc))


def _chunk_answer(chunk: Mapping[str, Any], latency_ms: int) -> _Answer | None:
    """The answer an in-band stream error chunk stands for (its code, reason, metadata),
    else None."""
    err = chunk.get("error")
    if not isinstance(err, dict):
        return None
    code = err.get("code")
    status = code if isinstance(code, int) and 400 <= code <= 599 else 502
    meta = err.get("metadata")
    answer = _Answer(status=status, latency_ms=latency_ms,
                     error_type=_error_type(status, {"error": err}) if status == 429
                     else "stream_error", message=str(err.get("message", "")),
                     metadata=dict(meta) if isinstance(meta, dict) else {})
    _provider_fields(answer, err)
    return answer


class _Plan:
    """Attempts, deadline and waits of one request."""

    def __init__(self, max_attempts: int, deadline: float, max_wait: float,
                 clock: Callable[[], float]) -> None:
        self.max_attempts = max_attempts
        self.ends = time.monotonic() + deadline
        self.max_wait = max_wait
        self.clock = clock
        self.attempts: list[Attempt] = []
        self.last: _Answer | None = None
        self.blocked: dict[str, float] = {}  # account -> epoch seconds of its X-RateLimit-Reset
        self.backoff = 0.0
        self.models: list[str] = []  # the caller's models, in order: switched on upstream 429s
        self.model = ""  # the model the next lease asks for

    @property
    def left(self) -> float:
        return self.ends - time.monotonic()

    def more(self) -> bool:
        return len(self.attempts) < self.max_attempts and self.left > 0

    def wait_for(self, seconds: float) -> float | None:
        """How long to sleep before going on, or None when that is too long."""
        if seconds <= 0:
            return 0.0
        if seconds > self.max_wait or seconds >= self.left:
            return None
        return seconds

    def hold(self, account: str) -> float:
        return self.blocked.get(account, 0.0) - self.clock()

    def record(self, lease: Lease, answer: _Answer) -> float:
        """Note one provider answer; returns seconds to pause before the next attempt."""
        self.attempts.append(Attempt(lease.key_id, lease.account, answer.status,
                                     answer.error_type, answer.latency_ms))
        self.last = answer
        if answer.upstream_limited:
            # The model is saturated upstream for everyone: another account will not help.
            # Switch model when the caller allows it; else the broker refuses the model until
            # its cooldown ends and its RetryInfo is waited for (no pause here).
            self.next_model(answer)
            return 0.0
        if answer.error_reason == "in_flight_budget_exhausted":
            # The broker holds the account's paid leases to what its budget admitted and
            # answers the next lease with the wait (RetryInfo): no pause of our own.
            return 0.0
        if answer.status == 429 and answer.reset_ms:
            # The account is limited until its reset: fail over at once, and never call
            # it again before then (see _next_lease).
            self.blocked[lease.account] = max(self.blocked.get(lease.account, 0.0),
                                              answer.reset_ms / 1000.0)
            return 0.0
        if answer.retry_after:
            return min(answer.retry_after, self.max_wait)
        if answer.status >= 500 or answer.status in (0, 408):
            self.backoff = min(max(self.backoff * 2, 0.05), 1.0)
            return self.backoff
        return 0.0

    def next_model(self, answer: _Answer) -> None:
        """After an upstream 429: the next model of the caller's list (``auto`` stays auto:
        the broker avoids the cooling model)."""
        if self.model in self.models and self.model != "auto":
            i = self.models.index(self.model)
            if i + 1 < len(self.models):
                self.model = self.models[i + 1]

    def model_cooling(self, exc: QuotaExhausted) -> bool:
        """Whether the broker refused because the model is cooling pool-wide and the caller
        listed another model to switch to (then switched)."""
        if not any(v.subject.startswith("model:") for v in exc.violations):
            return False
        before = self.model
        self.next_model(_Answer(status=429, latency_ms=0))
        return self.model != before

    def start(self, model: str, params: Mapping[str, Any]) -> None:
        """The model list of one request: ``model`` then the ``models`` fallback list."""
        extra = params.get("models")
        fallbacks = [m for m in extra if isinstance(m, str) and m] if isinstance(
            extra, list | tuple) else []
        self.models = list(dict.fromkeys([model, *fallbacks]))
        self.model = model

    def give_up(self, exhausted: QuotaExhausted | None = None) -> Exception:
        """The error that ends the request: the broker's QuotaExhausted when it has no key
        (it carries retry_after), else the provider's last answer."""
        if exhausted is not None:
            return exhausted
        if self.last is not None and not self.last.ok:
            return self.last.error(self.attempts)
        return OpenRouterError(0, "deadline passed before any attempt", attempts=self.attempts)


def _request_body(model: str, messages: Sequence[Mapping[str, Any]], stream: bool,
                  params: Mapping[str, Any]) -> bytes:
    """The JSON body of a chat completion, encoded as httpx's ``json=`` would."""
    body: dict[str, Any] = {"model": model, "messages": list(messages), **params}
    if stream:
        body["stream"] = True
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode()


def _check_request(model: str, messages: Sequence[Mapping[str, Any]], stream: bool,
                   params: Mapping[str, Any]) -> None:
    """Refuse, before any lease is taken, a request that could never be sent.

    Raises:
        ValueError: no model, or no messages (nor a ``prompt``), or a float JSON refuses.
        TypeError: messages that are not mappings, or a value JSON cannot encode.
    """
    if not isinstance(model, str) or not model:
        raise ValueError("model: a model id (or 'auto') is required")
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise TypeError("messages: expected a list of message mappings")
    if not messages and "prompt" not in params:
        raise ValueError("messages: at least one message (or a prompt) is required")
    if not all(isinstance(m, Mapping) for m in messages):
        raise TypeError("messages: every message must be a mapping")
    try:
        _request_body(model, messages, stream, params)
    except TypeError as exc:
        raise TypeError(f"the request body cannot be encoded as JSON: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"the request body cannot be encoded as JSON: {exc}") from None


def _assemble(chunks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A completion body from stream chunks (content joined, last finish_reason, usage)."""
    text: list[str] = []
    finish: Any = None
    usage: Any = {}
    head = dict(chunks[0]) if chunks else {}
    for c in chunks:
        for choice in c.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                text.append(str(delta["content"]))
            finish = choice.get("finish_reason") or finish
        usage = c.get("usage") or usage
    head.pop("choices", None)
    return head | {"object": "chat.completion", "usage": usage, "choices": [
        {"index": 0, "finish_reason": finish,
         "message": {"role": "assistant", "content": "".join(text)}}]}


class _SSE:
    """Incremental ``text/event-stream`` parser: comment lines skipped, data lines joined."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if line.startswith(":"):
            return None  # ": OPENROUTER PROCESSING" keep-alives
        if line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" "))
            return None
        if line == "" and self._data:
            event, self._data = "\n".join(self._data), []
            return event
        return None

    def flush(self) -> str | None:
        event, self._data = ("\n".join(self._data) if self._data else None), []
        return event


class _Base:
    def __init__(self, pool: str, *, max_attempts: int, deadline: float, timeout: float,
                 max_wait: float, priority: str, allow_internal: bool, lease_ttl: float | None,
                 headers: Mapping[str, str] | None, clock: Callable[[], float]) -> None:
        if max_attempts < 1 or deadline <= 0:
            raise ValueError("need max_attempts >= 1 and deadline > 0")
        self.pool = pool
        self.max_attempts, self.deadline, self.max_wait = max_attempts, deadline, max_wait
        self.timeout = timeout
        self.priority, self.allow_internal, self.lease_ttl = priority, allow_internal, lease_ttl
        self.headers = dict(headers or {})
        self.clock = clock

    def _plan(self) -> _Plan:
        return _Plan(self.max_attempts, self.deadline, self.max_wait, self.clock)

    def _lease_args(self) -> dict[str, Any]:
        return {"priority": self.priority, "allow_internal": self.allow_internal,
                "ttl": self.lease_ttl}

    def _http_timeout(self, plan: _Plan) -> httpx.Timeout:
        t = max(0.001, min(self.timeout, plan.left))
        return httpx.Timeout(t, connect=min(t, 10.0))

    def _request(self, lease: Lease) -> tuple[str, dict[str, str]]:
        url = lease.base_url.rstrip("/") + "/chat/completions"
        return url, {**self.headers, "Content-Type": "application/json",
                     "Authorization": f"Bearer {lease.api_key}"}

    @staticmethod
    def _internal(lease: Lease) -> RouteInternal:
        return RouteInternal(lease.internal_reason, lease.retry_after)


class OpenRouterClient(_Base):
    """asyncio OpenRouter chat completions through keys leased from a keybroker.

    Args:
        broker: a connected AsyncKeyBrokerClient.
        pool: the pool to lease from.
        max_attempts: most provider calls per request (failovers included).
        deadline: seconds one request may take in all, waits included.
        timeout: seconds one provider call may take (for streams: between chunks).
        max_wait: longest single wait for Retry-After, a rate-limit reset or the
            broker's retry_after; a longer one ends the request with the error.
        priority: ``high``, ``normal`` or ``low`` (the broker's hybrid routing).
        allow_internal: let the broker answer INTERNAL (raised as RouteInternal)
            instead of QuotaExhausted.
        lease_ttl: lease TTL in seconds (broker default when None).
        headers: extra headers for OpenRouter (``HTTP-Referer``, ``X-OpenRouter-Title``).
        http: an httpx.AsyncClient to use (not closed by ``aclose``).
        clock: wall-clock seconds, to judge ``X-RateLimit-Reset`` (epoch ms).
    """

    def __init__(self, broker: AsyncKeyBrokerClient, pool: str, *, max_attempts: int = 4,
                 deadline: float = 120.0, timeout: float = 60.0, max_wait: float = 10.0,
                 priority: str = "normal", allow_internal: bool = False,
                 lease_ttl: float | None = None, headers: Mapping[str, str] | None = None,
                 http: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(pool, max_attempts=max_attempts, deadline=deadline, timeout=timeout,
                         max_wait=max_wait, priority=priority, allow_internal=allow_internal,
                         lease_ttl=lease_ttl, headers=headers, clock=clock)
        self.broker = broker
        self._own_http = http is None
        self.http = http or httpx.AsyncClient()

    async def __aenter__(self) -> OpenRouterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    async def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str,
                   **params: Any) -> ChatResult:
        """One chat completion (``model="auto"`` lets the broker pick); ``params`` go into the
        request body (``max_tokens``, ``temperature``, ``tools``, ...).

        Raises:
            RouteInternal: the broker routed internally (``allow_internal=True``).
            QuotaExhausted: no key now and the wait is too long (``allow_internal=False``).
            OpenRouterError: a caller fault, or the last failure when attempts or time ran out.
            TypeError, ValueError: arguments that could never be sent (no lease is taken).
        """
        _check_request(model, messages, False, params)
        plan = self._plan()
        plan.start(model, params)
        while True:
            lease = await self._next_lease(plan, plan.model)
            trace = _Trace()
            try:
                url, headers = self._request(lease)
                name = lease.model or plan.model
                content = _request_body(name, messages, False, params)
                started = time.monotonic()
                try:
                    resp = await self.http.post(url, content=content, headers=headers,
                                                timeout=self._http_timeout(plan),
                                                extensions={"trace": trace.ahook})
                    answer = _answer(resp.status_code, resp.headers, resp.content,
                                     _ms(started), self.clock())
                except httpx.TransportError as exc:
                    answer = _no_response(exc, _ms(started), trace)
            except BaseException as exc:
                await self._abandon(lease, trace.may_have_sent(exc))
                raise
            await self._settle(lease, answer, name)
            pause = plan.record(lease, answer)
            if answer.ok:
                return ChatResult(answer.body, lease.key_id, lease.account, plan.attempts)
            if not answer.failover or not plan.more():
                raise answer.error(plan.attempts)
            await self._pause(plan, pause)

    @contextlib.asynccontextmanager
    async def stream(self, messages: Sequence[Mapping[str, Any]], *, model: str,
                     **params: Any) -> AsyncIterator[ChatStream]:
        """A streamed completion: ``async with router.stream(...) as s: async for chunk in s``.

        Failover happens until the provider answers 200; after that chunks pass
        through as they arrive and an in-band error raises OpenRouterError. On leaving
        the block, however it is left, the usage of the final chunk is reported and
        the lease completed; ``s.result`` then holds the assembled completion.
        """
        _check_request(model, messages, True, params)
        plan = self._plan()
        plan.start(model, params)
        while True:
            lease = await self._next_lease(plan, plan.model)
            trace = _Trace()
            try:
                url, headers = self._request(lease)
                name = lease.model or plan.model
                request = self.http.build_request(
                    "POST", url, content=_request_body(name, messages, True, params),
                    headers=headers, timeout=self._http_timeout(plan),
                    extensions={"trace": trace.ahook})
                started = time.monotonic()
                try:
                    resp = await self.http.send(request, stream=True)
                    if resp.status_code == 200:
                        break
                    try:
                        raw = await resp.aread()
                    finally:
                        await resp.aclose()
                    answer = _answer(resp.status_code, resp.headers, raw, _ms(started),
                                     self.clock())
                except httpx.TransportError as exc:
                    answer = _no_response(exc, _ms(started), trace)
            except BaseException as exc:
                await self._abandon(lease, trace.may_have_sent(exc))
                raise
            await self._settle(lease, answer, name)
            pause = plan.record(lease, answer)
            if not answer.failover or not plan.more():
                raise answer.error(plan.attempts)
            await self._pause(plan, pause)
        stream = ChatStream(resp, lease, plan, started)
        try:
            yield stream
        finally:
            try:
                await _shielded(resp.aclose())
            finally:
                answer = stream._outcome()
                await self._settle(lease, answer, name)
                plan.record(lease, answer)

    async def _next_lease(self, plan: _Plan, model: str) -> Lease:
        while True:
            try:
                lease = await self.broker.lease_key(self.pool, plan.model or model,
                                                    **self._lease_args())
            except QuotaExhausted as exc:
                if plan.model_cooling(exc):
                    continue  # the broker says the model is cooling: the next one on the list
                wait = plan.wait_for(exc.retry_after)
                if wait is None:
                    raise plan.give_up(exc) from None
                await asyncio.sleep(wait)
                continue
            if not lease.external:
                raise self._internal(lease)
            hold = plan.hold(lease.account)
            if hold <= 0:
                return lease
            # The provider said this account is limited until then: do not spend a call.
            await _shielded(self.broker.complete(lease.lease_id, used=False))
            wait = plan.wait_for(hold)
            if wait is None:
                raise plan.give_up()
            await asyncio.sleep(wait)

    async def _settle(self, lease: Lease, answer: _Answer, model: str) -> None:
        """Report the attempt's answer and complete its lease, whatever interrupts."""
        await _shielded(self._report_and_complete(lease, answer, model))

    async def _report_and_complete(self, lease: Lease, answer: _Answer, model: str) -> None:
        if answer.reconciles:  # refund first: the report's reconcile then has the last word
            try:
                await self.broker.complete(lease.lease_id, used=False)
            finally:
                await self.broker.report_usage(lease.lease_id, answer.status,
                                               **answer.report(model))
            return
        try:
            await self.broker.report_usage(lease.lease_id, answer.status, **answer.report(model))
        finally:
            await self.broker.complete(lease.lease_id, used=answer.used)

    async def _abandon(self, lease: Lease, used: bool) -> None:
        """Complete the lease of an attempt the caller cut short (no answer to report);
        the caller's exception matters more than a failure to complete."""
        with contextlib.suppress(Exception):
            await _shielded(self.broker.complete(lease.lease_id, used=used))

    @staticmethod
    async def _pause(plan: _Plan, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(min(seconds, max(plan.left, 0.0)))


class SyncOpenRouterClient(_Base):
    """Blocking twin of OpenRouterClient (same arguments; ``broker`` is a KeyBrokerClient,
    ``http`` an httpx.Client)."""

    def __init__(self, broker: KeyBrokerClient, pool: str, *, max_attempts: int = 4,
                 deadline: float = 120.0, timeout: float = 60.0, max_wait: float = 10.0,
                 priority: str = "normal", allow_internal: bool = False,
                 lease_ttl: float | None = None, headers: Mapping[str, str] | None = None,
                 http: httpx.Client | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(pool, max_attempts=max_attempts, deadline=deadline, timeout=timeout,
                         max_wait=max_wait, priority=priority, allow_internal=allow_internal,
                         lease_ttl=lease_ttl, headers=headers, clock=clock)
        self.broker = broker
        self._own_http = http is None
        self.http = http or httpx.Client()

    def __enter__(self) -> SyncOpenRouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str,
             **params: Any) -> ChatResult:
        """Like ``OpenRouterClient.chat``, blocking."""
        _check_request(model, messages, False, params)
        plan = self._plan()
        plan.start(model, params)
        while True:
            lease = self._next_lease(plan, plan.model)
            trace = _Trace()
            try:
                url, headers = self._request(lease)
                name = lease.model or plan.model
                content = _request_body(name, messages, False, params)
                started = time.monotonic()
                try:
                    resp = self.http.post(url, content=content, headers=headers,
                                          timeout=self._http_timeout(plan),
                                          extensions={"trace": trace.hook})
                    answer = _answer(resp.status_code, resp.headers, resp.content,
                                     _ms(started), self.clock())
                except httpx.TransportError as exc:
                    answer = _no_response(exc, _ms(started), trace)
            except BaseException as exc:  # KeyboardInterrupt included
                self._abandon(lease, trace.may_have_sent(exc))
                raise
            self._settle(lease, answer, name)
            pause = plan.record(lease, answer)
            if answer.ok:
                return ChatResult(answer.body, lease.key_id, lease.account, plan.attempts)
            if not answer.failover or not plan.more():
                raise answer.error(plan.attempts)
            time.sleep(min(pause, max(plan.left, 0.0)))

    @contextlib.contextmanager
    def stream(self, messages: Sequence[Mapping[str, Any]], *, model: str,
               **params: Any) -> Iterator[SyncChatStream]:
        """Like ``OpenRouterClient.stream``, blocking: ``with ... as s: for chunk in s``."""
        _check_request(model, messages, True, params)
        plan = self._plan()
        plan.start(model, params)
        while True:
            lease = self._next_lease(plan, plan.model)
            trace = _Trace()
            try:
                url, headers = self._request(lease)
                name = lease.model or plan.model
                request = self.http.build_request(
                    "POST", url, content=_request_body(name, messages, True, params),
                    headers=headers, timeout=self._http_timeout(plan),
                    extensions={"trace": trace.hook})
                started = time.monotonic()
                try:
                    resp = self.http.send(request, stream=True)
                    if resp.status_code == 200:
                        break
                    try:
                        raw = resp.read()
                    finally:
                        resp.close()
                    answer = _answer(resp.status_code, resp.headers, raw, _ms(started),
                                     self.clock())
                except httpx.TransportError as exc:
                    answer = _no_response(exc, _ms(started), trace)
            except BaseException as exc:
                self._abandon(lease, trace.may_have_sent(exc))
                raise
            self._settle(lease, answer, name)
            pause = plan.record(lease, answer)
            if not answer.failover or not plan.more():
                raise answer.error(plan.attempts)
            time.sleep(min(pause, max(plan.left, 0.0)))
        stream = SyncChatStream(resp, lease, plan, started)
        try:
            yield stream
        finally:
            try:
                resp.close()
            finally:
                answer = stream._outcome()
                self._settle(lease, answer, name)
                plan.record(lease, answer)

    def _next_lease(self, plan: _Plan, model: str) -> Lease:
        while True:
            try:
                lease = self.broker.lease_key(self.pool, plan.model or model,
                                              **self._lease_args())
            except QuotaExhausted as exc:
                if plan.model_cooling(exc):
                    continue  # the broker says the model is cooling: the next one on the list
                wait = plan.wait_for(exc.retry_after)
                if wait is None:
                    raise plan.give_up(exc) from None
                time.sleep(wait)
                continue
            if not lease.external:
                raise self._internal(lease)
            hold = plan.hold(lease.account)
            if hold <= 0:
                return lease
            self.broker.complete(lease.lease_id, used=False)
            wait = plan.wait_for(hold)
            if wait is None:
                raise plan.give_up()
            time.sleep(wait)

    def _settle(self, lease: Lease, answer: _Answer, model: str) -> None:
        if answer.reconciles:
            try:
                self.broker.complete(lease.lease_id, used=False)
            finally:
                self.broker.report_usage(lease.lease_id, answer.status, **answer.report(model))
            return
        try:
            self.broker.report_usage(lease.lease_id, answer.status, **answer.report(model))
        finally:
            self.broker.complete(lease.lease_id, used=answer.used)

    def _abandon(self, lease: Lease, used: bool) -> None:
        with contextlib.suppress(Exception):
            self.broker.complete(lease.lease_id, used=used)


class _StreamState:
    """What a stream has shown so far; shared by ChatStream and SyncChatStream."""

    def __init__(self, resp: httpx.Response, lease: Lease, plan: _Plan, started: float) -> None:
        self.key_id, self.account = lease.key_id, lease.account
        self._resp, self._lease, self._plan, self._started = resp, lease, plan, started
        self._sse = _SSE()
        self._chunks: list[dict[str, Any]] = []
        self._error: _Answer | None = None
        self._done = False
        self.result: ChatResult | None = None

    def _event(self, data: str) -> dict[str, Any] | None:
        """One SSE data payload -> a chunk to hand out, None to skip; raises on errors."""
        if data.strip() == "[DONE]":
            self._done = True
            return None
        try:
            chunk = json.loads(data)
        except ValueError:
            return None
        if not isinstance(chunk, dict):
            return None
        self._chunks.append(chunk)
        in_band = _chunk_answer(chunk, _ms(self._started))
        if in_band is not None:
            self._error = in_band
            self._done = True
            raise OpenRouterError(in_band.status, in_band.message, error_type=in_band.error_type,
                                  metadata=in_band.metadata, attempts=self._plan.attempts)
        return chunk

    def _broken(self, exc: httpx.TransportError) -> OpenRouterError:
        self._error = _Answer(status=502, latency_ms=_ms(self._started),
                              error_type="stream_interrupted", message=type(exc).__name__)
        self._done = True
        return OpenRouterError(502, f"stream interrupted ({type(exc).__name__})",
                               error_type="stream_interrupted", attempts=self._plan.attempts)

    def _outcome(self) -> _Answer:
        """The report for this stream: an in-band error, or 200 with the final usage."""
        data = _assemble(self._chunks)
        latency = _ms(self._started)
        if self._error is not None:
            # The in-band error is what the provider answered (a 429 after streaming began
            # is a 429, with its upstream provider), never a success.
            self._error.latency_ms = latency
            self._error.body = {"model": data.get("model", ""), "usage": data.get("usage")}
            return self._error
        if not self._done:
            # The caller left before the end: the call happened; report what was seen.
            return _Answer(status=200, latency_ms=latency, error_type="stream_abandoned",
                           body=data)
        self.result = ChatResult(data, self.key_id, self.account, self._plan.attempts)
        return _Answer(status=200, latency_ms=latency, body=data)

    @property
    def usage(self) -> dict[str, Any]:
        """The usage chunk's counts (empty until it arrived)."""
        return dict(_assemble(self._chunks).get("usage") or {})


class ChatStream(_StreamState):
    """Chunks of a streamed completion, as they arrive (``async for chunk in stream``).

    Attributes:
        key_id, account: the key serving the stream (never its secret).
        result: the assembled ChatResult once the stream ended with ``[DONE]``.
    """

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._chunks_async()

    async def _chunks_async(self) -> AsyncIterator[dict[str, Any]]:
        if self._done:
            return
        try:
            async for line in self._resp.aiter_lines():
                data = self._sse.feed(line)
                chunk = self._event(data) if data is not None else None
                if chunk is not None:
                    yield chunk
                if self._done:
                    return
        except httpx.TransportError as exc:
            raise self._broken(exc) from None
        tail = self._sse.flush()
        chunk = self._event(tail) if tail is not None else None
        if chunk is not None:
            yield chunk
        self._done = True


class SyncChatStream(_StreamState):
    """Chunks of a streamed completion for SyncOpenRouterClient (``for chunk in stream``)."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._done:
            return
        try:
            for line in self._resp.iter_lines():
                data = self._sse.feed(line)
                chunk = self._event(data) if data is not None else None
                if chunk is not None:
                    yield chunk
                if self._done:
                    return
        except httpx.TransportError as exc:
            raise self._broken(exc) from None
        tail = self._sse.flush()
        chunk = self._event(tail) if tail is not None else None
        if chunk is not None:
            yield chunk
        self._done = True


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
