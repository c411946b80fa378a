"""Typos are errors and outages are diagnosed: policy keys, KEYBROKER_* variables, Vault and
Redis outages in the log (rate-limited) and in the status clients get, the audit trail."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path

import grpc
import pytest

from broker.audit import Audit, AuditEvent, AuditFile
from broker.auth import Policy
from broker.config import StoreBackend, StoreSettings, load_settings
from broker.errors import InvalidArgument
from broker.testing import free_port
from tests.support import POLICY, wait_until


def test_unknown_policy_keys_are_refused_naming_the_nearest() -> None:
    """A misspelt key in a principal or a role is an error naming it and the intended key."""
    with pytest.raises(InvalidArgument, match=r"principals\[0\].*'tokn_sha256'.*token_sha256"):
        Policy.from_mapping({"principals": [{"name": "svc", "tokn_sha256": "ab" * 32}]})
    with pytest.raises(InvalidArgument, match=r"roles\.r.*'rcps'.*'rpcs'"):
        Policy.from_mapping({"roles": {"r": {"rcps": ["LeaseKey"]}}})
    with pytest.raises(InvalidArgument, match="'principal'"):
        Policy.from_mapping({"principal": []})


async def test_a_policy_typo_at_reload_keeps_the_old_policy_and_counts(
        tmp_path: Path, start_broker, connect, put_keys, log_lines) -> None:
    """A live policy file rewritten with an unknown key keeps the previous policy in force, logs
    policy.reload_failed once and counts keybroker_policy_reload_failures_total."""
    put_keys("free", [("k1", "acct-a")])
    path = tmp_path / "live-policy.toml"
    path.write_text(POLICY)
    broker = await start_broker(policy_file=str(path))
    broken = POLICY.replace("token_sha256", "tokn_sha256", 1)
    path.write_text(broken)
    later = path.stat().st_mtime_ns + 5_000_000_000
    os.utime(path, ns=(later, later))

    def errors() -> float:
        return broker.metrics.registry.get_sample_value(
            "keybroker_policy_reload_failures_total") or 0.0

    await wait_until(lambda: errors() == 1.0, timeout=8)
    await asyncio.sleep(1.5)  # another reload round: the same bad file is not counted again
    assert errors() == 1.0
    failed = [x for x in log_lines() if x.get("event") == "policy.reload_failed"]
    assert len(failed) == 1 and "tokn_sha256" in failed[0]["error"]
    grant = await connect(broker, "alice").lease_key("free")  # the old policy still admits
    assert grant.lease_id


def test_unknown_keybroker_variables_refuse_to_start() -> None:
    """A KEYBROKER_* variable nothing reads is refused naming the nearest known one, while the
    variables the CLI, clients and tests read are accepted."""
    with pytest.raises(InvalidArgument,
                       match=r"KEYBROKER_STORE_BACKND.*'KEYBROKER_STORE_BACKEND'"):
        load_settings(None, {"KEYBROKER_STORE_BACKND": "redis"})
    known = {"KEYBROKER_TOKEN": "t", "KEYBROKER_TARGET": "x:1", "KEYBROKER_ADDR": "x:1",
             "KEYBROKER_CONFIG": "", "KEYBROKER_TOKEN_ALICE": "t", "KEYBROKER_TLS_TARGET": "",
             "KEYBROKER_CA_FILE": "", "KEYBROKER_CLIENT_CERT_FILE": "",
             "KEYBROKER_CLIENT_KEY_FILE": "", "KEYBROKER_STORE_BACKEND": "redis"}
    assert load_settings(None, known).store.backend is StoreBackend.REDIS


def test_config_messages_name_the_section_and_list_choices(tmp_path: Path) -> None:
    """Config errors name the file and section, suggest the nearest setting, and a bad choice
    lists the valid ones."""
    path = tmp_path / "kb.toml"
    path.write_text('[pools.free]\nstratgy = "x"\n')
    with pytest.raises(InvalidArgument) as info:
        load_settings(path, {})
    assert info.value.message == (f"{path}: [pools.free]: unknown setting 'stratgy' "
                                  "(did you mean 'strategy'?)")
    path.write_text('[pools.free]\nstrategy = "best"\n')
    with pytest.raises(InvalidArgument,
                       match=r"\[pools.free\]: strategy.*round_robin, least_used"):
        load_settings(path, {})


def test_throttle_logs_the_first_then_one_summary_a_minute() -> None:
    """A recurring failure is logged at once, then at most once a minute with a repeat count."""
    from broker.logging import Throttle

    now = [0.0]
    lines: list[tuple[str, dict[str, object]]] = []

    class Log:
        def warning(self, event: str, **fields: object) -> None:
            lines.append((event, fields))

    throttle = Throttle(Log(), "x.failed", clock=lambda: now[0])
    for _ in range(100):  # one a second for 100 s
        throttle(error="e")
        now[0] += 1.0
    assert [f.get("repeated") for _, f in lines] == [None, 59]
    throttle.clear()
    throttle(error="again")
    assert len(lines) == 3


async def test_an_unreachable_vault_is_named_to_clients_and_logged_once(
        start_broker, connect, vault_settings, log_lines) -> None:
    """With Vault's address wrong, LeaseKey answers UNAVAILABLE naming Vault, its address and
    the cause, and the log says it once however often the load is retried."""
    dead = f"http://127.0.0.1:{free_port()}"
    broker = await start_broker(wait_ready=False, vault=dataclasses.replace(
        vault_settings, addr=dead, reload_interval=0.2, timeout=0.5))
    await wait_until(lambda: broker.source_error is not None and dead in broker.source_error)
    await asyncio.sleep(1.5)  # several reload attempts
    with pytest.raises(Exception) as info:
        await connect(broker, "alice").lease_key("free")
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert f"vault unreachable at {dead}" in info.value.message
    assert "connection refused" in info.value.message
    failed = [x for x in log_lines() if x.get("event") == "keys.reload_failed"]
    assert len(failed) == 1 and dead in failed[0]["error"]


async def test_a_wrong_redis_url_is_logged_rate_limited(tmp_path, start_broker,
                                                        log_lines) -> None:
    """With Redis unreachable the sweeper's failures and the start-up retries are logged once
    each, not every round."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    await start_broker(wait_ready=False, store=StoreSettings(
        backend=StoreBackend.REDIS, redis_url=url, redis_timeout=0.1))
    await asyncio.sleep(2.0)  # sweep_interval 0.05: dozens of failed rounds
    events = [x.get("event") for x in log_lines()]
    assert events.count("sweep.failed") == 1, events
    assert events.count("store.unavailable_at_start") == 1, events


async def test_a_stop_logs_one_line(start_broker, put_keys, log_lines) -> None:
    """Stopping a broker logs exactly one line, broker.stopped."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    before = len(log_lines())
    await broker.stop(0)
    after = [x["event"] for x in log_lines()[before:]]
    assert after == ["broker.stopped"], after


def test_audit_records_carry_rfc3339_time_and_the_key_pool(tmp_path: Path) -> None:
    """An audit file's ts is RFC 3339 UTC, and a record about a key names the key's pool."""
    path = tmp_path / "audit.jsonl"
    sink = AuditFile(path)
    Audit(sinks=[sink]).record(AuditEvent.KEY_HEALTH, decision="cooling_down",
                               key_id="free/k1", subject="k:free/k1")
    sink.close()
    rec = json.loads(path.read_text())
    assert rec["pool"] == "free"
    assert rec["ts"].endswith("Z") and "T" in rec["ts"]
    from datetime import datetime

    assert abs(datetime.fromisoformat(rec["ts"]).timestamp() - time.time()) < 60


def test_audit_since_takes_iso_epoch_and_durations() -> None:
    """--since reads ISO 8601 (UTC unless zoned), epoch seconds and durations back from now."""
    from broker.cli import parse_when

    now = 1_800_000_000.0
    assert parse_when("2026-11-27T10:00", "--since") == parse_when("2026-11-27T10:00Z", "x")
    assert parse_when("1764237600", "--since") == 1764237600.0
    assert parse_when("1h", "--since", now) == now - 3600
    assert parse_when("30m", "--since", now) == now - 1800
    assert parse_when("2d", "--since", now) == now - 2 * 86400
    assert parse_when("", "--since") is None


async def test_audit_command_filters_rfc3339_records_by_duration(tmp_path, start_broker,
                                                                 put_keys, connect) -> None:
    """Records a broker just wrote are found by `keybroker audit --since 1h` and not by a
    --since in the future."""
    import subprocess
    import sys

    put_keys("free", [("k1", "acct-a")])
    path = tmp_path / "audit.jsonl"
    broker = await start_broker(audit_file=str(path))
    await connect(broker, "alice").lease_key("free")
    exe = str(Path(sys.executable).parent / "keybroker")
    found = subprocess.run([exe, "audit", str(path), "--since", "1h", "--event", "lease."],
                           capture_output=True, text=True, timeout=60, check=True)
    assert [json.loads(x)["event"] for x in found.stdout.splitlines()] == ["lease.granted"]
    none = subprocess.run([exe, "audit", str(path), "--since", str(time.time() + 3600)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert none.stdout == ""


@pytest.mark.timeout(120)
def test_an_unreachable_otlp_collector_is_logged_as_json_and_stop_is_bounded(
        tmp_path: Path) -> None:
    """With the OTLP collector unreachable, the exporter's complaints are structured log events
    (every stdout line is JSON, nothing on stderr) and SIGTERM ends the broker without waiting
    out the exporter's 10 s retry budget."""
    import subprocess
    import sys

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OTEL_"))}
    env.update(KEYBROKER_LISTEN=f"127.0.0.1:{port}", KEYBROKER_VAULT_TOKEN="x",
               KEYBROKER_VAULT_ADDR=f"http://127.0.0.1:{free_port()}",
               KEYBROKER_STORE_SQLITE_PATH=str(tmp_path / "state.db"),
               OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",
               OTEL_BSP_SCHEDULE_DELAY="100")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "keybroker"), "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "keybroker listening" in line:
            break
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for _ in range(3):  # traced RPCs: spans to export
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    time.sleep(1.5)  # the batch processor tries (and fails) to export
    began = time.monotonic()
    proc.terminate()
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - began
    assert err == "", err
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert any(r["event"] == "library.log" and r["logger"].startswith("opentelemetry")
               for r in records), [r["event"] for r in records]
    assert records[-1]["event"] == "broker.stopped"
    assert took < 5.0, took  # bounded: SPAN_FLUSH_SECONDS (1.5 s) plus the rest of a stop
