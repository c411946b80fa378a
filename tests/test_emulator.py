"""The OpenRouter emulator answers like OpenRouter (openrouter-api.md), on a real port."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from broker.clock import ManualClock
from broker.testing import Emulator

FREE = "meta-llama/llama-3.3-70b-instruct:free"
PAID = "openai/gpt-4o-mini"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def emu(clock: ManualClock) -> AsyncIterator[Emulator]:
    async with Emulator(clock=clock, seed=1) as emulator:
        yield emulator


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def chat(http: httpx.AsyncClient, emu: Emulator, secret: str, model: str = FREE,
               **body: object) -> httpx.Response:
    return await http.post(f"{emu.base_url}/chat/completions",
                           headers={"Authorization": f"Bearer {secret}"},
                           json={"model": model, "messages": HELLO, **body})


async def key_info(http: httpx.AsyncClient, emu: Emulator, secret: str,
                   path: str = "/key") -> httpx.Response:
    return await http.get(emu.base_url + path, headers={"Authorization": f"Bearer {secret}"})


def sse_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line]


async def test_completion_has_openrouter_shape_and_no_ratelimit_headers(emu, http):
    """A successful completion has OpenRouter's fields and carries no X-RateLimit-* headers."""
    secret = emu.add_key("acct-a")
    resp = await chat(http, emu, secret, max_tokens=5)
    assert resp.status_code == 200
    assert not [h for h in resp.headers if h.lower().startswith("x-ratelimit")]
    body = resp.json()
    assert body["id"].startswith("gen-") and body["object"] == "chat.completion"
    assert body["model"] == FREE and body["provider"]
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["role"] == "assistant"
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens", "cost"}
    assert body["usage"]["completion_tokens"] == 5 and body["usage"]["cost"] == 0


async def test_minute_limit_429_body_and_headers_are_openrouters(emu, http, clock):
    """The 21st free request in a calendar minute gets OpenRouter's 429 body and headers."""
    secret = emu.add_key("acct-a")
    for _ in range(20):
        assert (await chat(http, emu, secret)).status_code == 200
    resp = await chat(http, emu, secret)
    reset = str(int((clock.now() // 60 + 1) * 60 * 1000))
    values = {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset}
    assert resp.status_code == 429
    assert {k: resp.headers[k] for k in values} == values
    assert "retry-after" not in resp.headers
    body = resp.json()
    assert body["error"] == {"message": "Rate limit exceeded: free-models-per-min. ", "code": 429,
                             "metadata": {"headers": values, "provider_name": None}}
    clock.advance(60)
    assert (await chat(http, emu, secret)).status_code == 200


async def test_daily_limit_is_per_account_across_keys(emu, http, clock):
    """Two keys of one account share 50 free requests a day; another account is unaffected."""
    a1, a2, b1 = emu.add_key("acct-a"), emu.add_key("acct-a"), emu.add_key("acct-b")
    for i in range(50):
        if i % 20 == 0:
            clock.advance(60)  # stay under the minute limit
        assert (await chat(http, emu, a1 if i % 2 else a2)).status_code == 200
    resp = await chat(http, emu, a1)
    midnight_ms = int((clock.now() // 86400 + 1) * 86400 * 1000)
    assert resp.status_code == 429
    assert resp.json()["error"]["message"] == ("Rate limit exceeded: free-models-per-day. Add 10 "
                                               "credits to unlock 1000 free model requests per day")
    assert resp.json()["error"]["metadata"]["headers"] == {
        "X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(midnight_ms)}
    assert (await chat(http, emu, a2)).status_code == 429
    assert (await chat(http, emu, b1)).status_code == 200
    assert emu.free_requests_today("acct-a") == 50


async def test_ten_credits_unlock_1000_a_day(emu, http):
    """An account that bought 10 credits gets 1000 free requests a day and the high-balance 429."""
    emu.add_account("rich", credits=10)
    secret = emu.add_key("rich")
    emu.use("rich", 999)
    assert (await chat(http, emu, secret)).status_code == 200
    resp = await chat(http, emu, secret)
    assert resp.json()["error"]["message"] == "Rate limit exceeded: free-models-per-day-high-balance. "
    assert resp.headers["X-RateLimit-Limit"] == "1000"


async def test_failed_attempts_count_but_refusals_do_not(emu, http):
    """Injected 502s count toward the day; 401s and 429s do not."""
    secret = emu.add_key("acct-a")
    emu.faults.failure_rate = 1.0
    resp = await chat(http, emu, secret)
    assert resp.status_code == 502
    assert resp.json()["error"]["message"] == "Provider returned error"
    assert resp.json()["error"]["metadata"]["provider_name"] and resp.json()["user_id"]
    assert (await chat(http, emu, "sk-or-v1-unknown")).status_code == 401
    emu.use("acct-a", 48)
    assert (await chat(http, emu, secret)).status_code == 502  # the 50th today
    assert (await chat(http, emu, secret)).status_code == 429
    info = (await key_info(http, emu, secret)).json()["data"]["free_model_daily_requests"]
    assert info == {"used": 50, "limit": 50, "remaining": 0}


async def test_key_endpoint_reports_free_model_daily_requests(emu, http):
    """/key and /auth/key report usage and free_model_daily_requests; a bad key gets 401."""
    secret = emu.add_key("acct-a")
    for _ in range(3):
        await chat(http, emu, secret)
    for path in ("/key", "/auth/key"):
        data = (await key_info(http, emu, secret, path)).json()["data"]
        assert data["free_model_daily_requests"] == {"used": 3, "limit": 50, "remaining": 47}
        assert data["label"] == f"{secret[:12]}...{secret[-3:]}" and data["is_free_tier"] is True
        assert {"usage", "usage_daily", "usage_weekly", "usage_monthly", "limit",
                "rate_limit", "expires_at"} <= set(data)
    bad = await key_info(http, emu, "sk-or-v1-nope")
    assert bad.status_code == 401 and bad.json() == {
        "error": {"message": "User not found.", "code": 401}}
    missing = await http.get(emu.base_url + "/key")
    assert missing.json()["error"]["message"] == "No auth credentials found"
    emu.revoke(secret)
    assert (await key_info(http, emu, secret)).status_code == 401
    assert (await chat(http, emu, secret)).status_code == 401


async def test_models_lists_the_catalog(emu, http):
    """/models needs no key and lists models with pricing, context and parameters."""
    data = (await http.get(emu.base_url + "/models")).json()["data"]
    free = next(m for m in data if m["id"] == FREE)
    assert free["pricing"]["prompt"] == "0" and free["context_length"] == 131072
    assert "tools" in free["supported_parameters"] and free["canonical_slug"] == FREE[:-5]
    assert not any(k.startswith("x_") for m in data for k in m)
    with_tools = (await http.get(emu.base_url + "/models",
                                 params={"supported_parameters": "tools"})).json()["data"]
    assert 0 < len(with_tools) < len(data)


async def test_streaming_format(emu, http):
    """A stream has processing comments, chunks, a usage chunk and ends with [DONE]."""
    secret = emu.add_key("acct-a")
    emu.faults.latency, emu.faults.processing_interval = 0.05, 0.02
    resp = await chat(http, emu, secret, stream=True, max_tokens=3)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    lines = sse_lines(resp.text)
    assert lines[0] == ": OPENROUTER PROCESSING" and lines.count(": OPENROUTER PROCESSING") >= 2
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len(text.split()) == 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_in_band_stream_error(emu, http):
    """An error after the stream began comes with HTTP 200 as an error chunk, and still counts."""
    secret = emu.add_key("acct-a")
    emu.faults.stream_error_rate = 1.0
    resp = await chat(http, emu, secret, stream=True)
    assert resp.status_code == 200
    chunks = [json.loads(line[6:]) for line in sse_lines(resp.text) if line.startswith("data: {")]
    last = chunks[-1]
    assert last["error"]["message"] and last["choices"][0]["finish_reason"] == "error"
    assert "data: [DONE]" not in resp.text
    assert emu.free_requests_today("acct-a") == 1


async def test_paid_models_need_credits(emu, http):
    """A paid model answers 402 without balance; with balance it is charged and shows in /key."""
    secret = emu.add_key("broke")
    resp = await chat(http, emu, secret, PAID)
    assert resp.status_code == 402 and resp.json()["error"]["message"].startswith(
        "Insufficient credits.")
    emu.add_account("payer", credits=20, balance=1.0)
    paying = emu.add_key("payer")
    resp = await chat(http, emu, paying, PAID)
    cost = resp.json()["usage"]["cost"]
    assert resp.status_code == 200 and cost > 0
    data = (await key_info(http, emu, paying)).json()["data"]
    assert data["usage"] == pytest.approx(cost) and data["usage_daily"] == pytest.approx(cost)
    assert data["free_model_daily_requests"]["used"] == 0 and data["is_free_tier"] is False
    assert emu.accounts["payer"].balance == pytest.approx(1.0 - cost)


async def test_high_demand_cap_per_model(clock, http):
    """A per-model high-demand cap answers 429 for everyone once the model's minute is full."""
    async with Emulator(clock=clock, model_rpm={FREE: 2}) as emu:
        a, b = emu.add_key("acct-a"), emu.add_key("acct-b")
        assert (await chat(http, emu, a)).status_code == 200
        assert (await chat(http, emu, b)).status_code == 200
        resp = await chat(http, emu, a)
        assert resp.status_code == 429
        message = resp.json()["error"]["message"]
        assert message.startswith(f"Rate limit exceeded: limit_rpm/{FREE[:-5]}/")
        assert message.endswith(f"High demand for {FREE} on OpenRouter - limited to 2 requests "
                                "per minute. Please retry shortly.")
        assert (await chat(http, emu, a, "z-ai/glm-4.5-air:free")).status_code == 200


async def test_error_bodies(emu, http):
    """400, 403, 404, 408 and 503 carry OpenRouter's messages; the status equals error.code."""
    secret = emu.add_key("acct-a")
    bad = await chat(http, emu, secret, "nope/model")
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "nope/model is not a valid model ID"
    flagged = await http.post(f"{emu.base_url}/chat/completions",
                              headers={"Authorization": f"Bearer {secret}"},
                              json={"model": FREE, "messages": [
                                  {"role": "user", "content": "x [[flag-me]]"}]})
    meta = flagged.json()["error"]["metadata"]
    assert flagged.status_code == 403 and {"reasons", "flagged_input", "provider_name",
                                           "model_slug"} <= set(meta)
    emu.faults.unavailable_models.add(FREE)
    gone = await chat(http, emu, secret)
    assert gone.json()["error"] == {"message": f"No endpoints found for {FREE}.", "code": 404}
    emu.faults.unavailable_models.clear()
    for status, message in ((408, "Operation timed out. Please try again later."),
                            (503, "Service temporarily unavailable")):
        emu.faults.outage = status
        resp = await chat(http, emu, secret)
        assert resp.status_code == status == resp.json()["error"]["code"]
        assert resp.json()["error"]["message"] == message


async def test_injected_clock_across_midnight(http):
    """An account that spent its day at 23:59 UTC may call again after 00:00 UTC."""
    clock = ManualClock(datetime(2026, 3, 10, 23, 58, 30, tzinfo=UTC))
    async with Emulator(clock=clock) as emu:
        secret = emu.add_key("acct-a")
        emu.use("acct-a", 50)
        resp = await chat(http, emu, secret)
        assert resp.status_code == 429
        assert resp.headers["X-RateLimit-Reset"] == str(
            int(datetime(2026, 3, 11, tzinfo=UTC).timestamp() * 1000))
        clock.set(datetime(2026, 3, 11, 0, 0, 1, tzinfo=UTC))
        assert (await chat(http, emu, secret)).status_code == 200
        assert emu.free_requests_today("acct-a") == 1


async def test_admin_endpoints_set_faults_and_show_counts(emu, http):
    """The admin HTTP endpoints change faults, revoke keys and show counts without secrets."""
    secret = emu.add_key("acct-a", name="a1")
    await chat(http, emu, secret)
    root = emu.base_url.removesuffix("/api/v1")
    resp = await http.post(root + "/_emulator/faults", json={"outage": 503, "revoke": "a1"})
    assert resp.status_code == 200 and emu.faults.outage == 503
    accounts = (await http.get(root + "/_emulator/accounts")).json()["accounts"]
    assert accounts[0]["free_requests_today"] == 1
    assert accounts[0]["keys"] == [{"name": "a1", "revoked": True}]
    assert secret not in json.dumps(accounts)
    assert (await http.post(root + "/_emulator/faults", json={"nope": 1})).status_code == 400


def test_cli_serves_accounts_from_a_file_until_sigterm(tmp_path):
    """`keybroker emulate-openrouter --accounts FILE` serves those keys and stops on SIGTERM."""
    secret = "sk-or-v1-" + "ab" * 32
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(f'[accounts.team-x]\ncredits = 10\nkeys = {{ x1 = "{secret}" }}\n')
    proc = subprocess.Popen([str(Path(sys.executable).parent / "keybroker"),
                             "emulate-openrouter", "--port", "0", "--accounts", str(accounts)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().split()[-1]
        data = httpx.get(base_url + "/key", headers={"Authorization": f"Bearer {secret}"},
                         timeout=5).json()["data"]
        assert data["free_model_daily_requests"] == {"used": 0, "limit": 1000, "remaining": 1000}
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert secret not in out + err
