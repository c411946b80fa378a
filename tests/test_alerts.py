"""Alert rules fire once per episode to a real webhook receiver, and say when they clear."""

from __future__ import annotations

import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from broker.config import AlertSettings, QuotaSettings
from tests.support import wait_until


class Hook:
    """A local HTTP server collecting webhook bodies; the first ``fail_first`` answer 503."""

    def __init__(self, fail_first: int = 0) -> None:
        self.bodies: list[dict] = []
        self.attempts = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.attempts += 1
                if hook.attempts <= fail_first:
                    self.send_response(503)
                else:
                    hook.bodies.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def states(self) -> list[tuple[str, str, str]]:
        return [(b["alert"]["rule"], b["alert"]["subject"], b["alert"]["state"])
                for b in self.bodies]


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


async def test_key_disabled_fires_once_and_resolves(start_broker, put_keys, connect, hook):
    """A disabled key alerts once however often rules run, and resolves when re-enabled."""
    put_keys("free", [("k1", "acct-a"), ("k2", "acct-b")])
    broker = await start_broker(alerts=AlertSettings(webhooks=hook.url, interval=3600))
    client = connect(broker)
    lease = await client.lease_key("free")
    await client.report_usage(lease.lease_id, 401)
    for _ in range(3):
        await broker.alerts.evaluate()
    assert hook.states() == [("key_unhealthy", lease.key_id, "firing")]
    assert hook.bodies[0]["text"].startswith(":rotating_light: [FIRING]")
    await connect(broker, "admin").set_key_enabled(lease.key_id, True)
    await broker.alerts.evaluate()
    assert hook.states()[-1] == ("key_unhealthy", lease.key_id, "resolved")


async def test_pool_low_and_exhausted(start_broker, put_keys, connect, hook):
    """A pool under 10% of its day alerts as low, then as exhausted when nothing is left."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(alerts=AlertSettings(webhooks=hook.url, interval=3600),
                                quota=QuotaSettings(daily_limit=20, minute_limit=100))
    client = connect(broker)
    for _ in range(19):
        await client.lease_key("free")
    await broker.alerts.evaluate()
    await client.lease_key("free")
    await broker.alerts.evaluate()
    assert hook.states() == [("pool_low", "free", "firing"), ("pool_exhausted", "free", "firing"),
                             ("pool_low", "free", "resolved")]


async def test_error_rate_over_the_window(start_broker, put_keys, connect, hook, clock):
    """More than half the calls failing within the window alerts; it clears as they age out."""
    put_keys("free", [("k1", "acct-a")])
    settings = AlertSettings(webhooks=hook.url, interval=3600, error_min_reports=4,
                             error_rate=0.5, error_window=60)
    broker = await start_broker(alerts=settings)
    client = connect(broker)
    for status in (200, 503, 502, 503):
        await client.report_usage((await client.lease_key("free")).lease_id, status)
    await broker.alerts.evaluate()
    assert ("error_rate", "free", "firing") in hook.states()
    clock.advance(61)
    await broker.alerts.evaluate()
    assert ("error_rate", "free", "resolved") in hook.states()


async def test_vault_unreachable_for_too_long(start_broker, hook, clock, vault_settings):
    """Vault failing reloads for longer than the threshold alerts once."""
    from broker.testing import BaoDevServer
    from broker.vault import VaultAdmin, VaultSession

    bao = BaoDevServer().start()
    try:
        own = dataclasses.replace(vault_settings, addr=bao.addr, token=bao.root_token,
                                  timeout=1.0)
        admin = VaultAdmin(VaultSession(own))
        admin.bootstrap()
        admin.put_key("free", "k1", "sk-or-v1-alert-test-0001", account="acct-a")
        broker = await start_broker(vault=own, alerts=AlertSettings(
            webhooks=hook.url, interval=3600, vault_down_seconds=30))
    finally:
        bao.close()
    await broker.reload_now()  # Vault is gone: the broker keeps its cached key
    assert broker.source_error is not None
    await broker.alerts.evaluate()
    assert hook.states() == []
    clock.advance(31)
    await broker.alerts.evaluate()
    assert hook.states() == [("vault_unreachable", "vault", "firing")]


async def test_webhook_delivery_is_retried(start_broker, put_keys, connect):
    """A webhook answering 503 twice still gets the alert on the third attempt."""
    flaky = Hook(fail_first=2)
    try:
        put_keys("free", [("k1", "acct-a"), ("k2", "acct-b")])
        broker = await start_broker(alerts=AlertSettings(webhooks=flaky.url, interval=3600))
        client = connect(broker)
        await client.report_usage((await client.lease_key("free")).lease_id, 401)
        await broker.alerts.evaluate()
        assert flaky.attempts == 3 and len(flaky.bodies) == 1
        assert flaky.bodies[0]["alert"]["rule"] == "key_unhealthy"
    finally:
        flaky.close()


async def test_alert_loop_runs_by_itself(start_broker, put_keys, connect, hook):
    """With a short interval the broker evaluates the rules without being asked."""
    put_keys("free", [("k1", "acct-a"), ("k2", "acct-b")])
    broker = await start_broker(alerts=dataclasses.replace(AlertSettings(), webhooks=hook.url,
                                                           interval=0.05))
    client = connect(broker)
    await client.report_usage((await client.lease_key("free")).lease_id, 401)
    await wait_until(lambda: bool(hook.bodies))
    assert hook.states() == [("key_unhealthy", "free/k1", "firing")]


async def test_an_account_out_of_credits_alerts_until_a_call_shows_credit(start_broker, put_keys,
                                                                          connect, clock):
    """A 402 for credits fires an account_out_of_credits alert (the key is not disabled); a
    later successful call on the account resolves it."""
    hook = Hook()
    try:
        put_keys("free", [("k1", "acct-a")])
        broker = await start_broker(alerts=AlertSettings(webhooks=hook.url, interval=3600))
        client = connect(broker)
        await client.report_usage((await client.lease_key("free")).lease_id, 402)
        fired, _ = await broker.alerts.evaluate()
        stop = [a for a in fired if a.rule == "account_out_of_credits"]
        assert len(stop) == 1 and "negative balance" in stop[0].summary
        assert "key_unhealthy" not in {a.rule for a in fired}
        clock.advance(3600)  # past the re-check: the next lease is the check
        await client.report_usage((await client.lease_key("free")).lease_id, 200)
        _, resolved = await broker.alerts.evaluate()
        assert "account_out_of_credits" in {a.rule for a in resolved}
    finally:
        hook.close()
