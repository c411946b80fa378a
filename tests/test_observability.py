"""Traces to a real OTLP receiver, Prometheus metrics, and the audit file."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import pytest
from keybroker_client import PermissionDenied, QuotaExhausted
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from broker.config import QuotaSettings
from tests.support import wait_until


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC TraceService, the way the broker would reach Jaeger."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self):
        return [span for req in self.requests for rs in req.resource_spans
                for ss in rs.scope_spans for span in ss.spans]


@pytest.fixture
async def otlp(monkeypatch):
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "keybroker-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    yield receiver
    await server.stop(0)


def attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = (v.string_value or v.int_value or v.bool_value or v.double_value)
    return out


async def test_spans_reach_the_otlp_receiver_with_decisions_and_codes(
        otlp, start_broker, put_keys, connect):
    """Each RPC is a server span carrying the decision, its real status code, and child spans."""
    secrets_ = put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(quota=QuotaSettings(daily_limit=1, minute_limit=10))
    assert broker.tracer_provider is not None
    client = connect(broker)
    lease = await client.lease_key("free")
    with pytest.raises(QuotaExhausted):
        await client.lease_key("free")
    with pytest.raises(PermissionDenied):
        await connect(broker, "carol").lease_key("paid")
    await client.complete(lease.lease_id)
    await broker.stop(0)  # flushes the batch processor
    spans = otlp.spans()
    leases = [s for s in spans if s.name.endswith("KeyBroker/LeaseKey")]
    assert len(leases) == 3
    granted, exhausted, denied = sorted(leases, key=lambda s: s.start_time_unix_nano)
    a = attrs(granted)
    assert (a["keybroker.decision"], a["keybroker.principal"], a["keybroker.pool"],
            a["keybroker.key_id"], a["keybroker.account"], a["keybroker.route"],
            a["keybroker.strategy"]) == ("granted", "alice", "free", "free/k1", "acct-a",
                                         "external", "round_robin")
    assert attrs(exhausted)["rpc.grpc.status_code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert attrs(exhausted)["keybroker.decision"] == "exhausted"
    assert exhausted.status.code != 2, "an exhausted quota is an expected outcome, not an error"
    assert attrs(denied)["rpc.grpc.status_code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
    children = [s for s in spans if s.name == "store.reserve"]
    assert any(c.parent_span_id == granted.span_id and c.trace_id == granted.trace_id
               for c in children)
    assert any(s.name == "vault.load_keys" for s in spans)
    exported = b"".join(r.SerializeToString() for r in otlp.requests)
    for secret in secrets_.values():
        assert secret.encode() not in exported


async def test_the_callers_trace_context_is_continued(otlp, start_broker, put_keys, connect):
    """A span the caller has open becomes the parent of the broker's server span."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    client = connect(broker)
    tracer = TracerProvider().get_tracer("caller")
    with tracer.start_as_current_span("checkout") as parent:
        await client.lease_key("free")
    await broker.stop(0)
    server = next(s for s in otlp.spans() if s.name.endswith("LeaseKey"))
    ctx = parent.get_span_context()
    assert server.trace_id == ctx.trace_id.to_bytes(16, "big")
    assert server.parent_span_id == ctx.span_id.to_bytes(8, "big")


async def test_metrics_endpoint_reports_leases_quota_and_health(start_broker, put_keys,
                                                                connect):
    """/metrics counts lease decisions and exports quota left and health per key."""
    put_keys("free", [("k1", "acct-a"), ("k2", "acct-b")])
    broker = await start_broker(metrics_listen="127.0.0.1:0",
                                quota=QuotaSettings(daily_limit=5, minute_limit=100))
    client = connect(broker)
    for _ in range(3):
        lease = await client.lease_key("free")
    await client.report_usage(lease.lease_id, 401)
    text = (await asyncio.to_thread(
        httpx.get, f"http://127.0.0.1:{broker.metrics_port}/metrics")).text
    assert 'keybroker_leases_total{decision="granted",pool="free",reason=""} 3.0' in text
    assert 'keybroker_account_quota_remaining{account="acct-a"} 3.0' in text
    assert 'keybroker_account_quota_remaining{account="acct-b"} 4.0' in text
    assert 'keybroker_key_health{key_id="free/k1",pool="free",state="disabled"} 1.0' in text
    assert 'keybroker_key_health{key_id="free/k2",pool="free",state="healthy"} 1.0' in text
    assert 'keybroker_rpc_duration_seconds_count{code="OK",rpc="LeaseKey"} 3.0' in text


async def test_audit_file_holds_every_decision(start_broker, put_keys, connect, tmp_path):
    """With audit_file set every decision is appended as one JSON line."""
    put_keys("free", [("k1", "acct-a")])
    path = tmp_path / "audit.jsonl"
    broker = await start_broker(audit_file=str(path))
    client = connect(broker)
    lease = await client.lease_key("free")
    await client.complete(lease.lease_id, used=False)
    with pytest.raises(PermissionDenied):
        await connect(broker, "nobody").lease_key("free")
    await wait_until(lambda: path.exists() and path.read_text().count("\n") >= 3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    events = [(r["event"], r["principal"]) for r in records if r["event"] != "keys.reloaded"]
    assert events == [("lease.granted", "alice"), ("lease.completed", "alice"),
                      ("rpc.denied", "nobody")]
    assert records[-1]["decision"] == "denied" and records[-1]["rpc"] == "LeaseKey"


async def test_a_replay_that_hands_out_a_secret_is_audited_once_per_answer(
        start_broker, put_keys, connect, tmp_path):
    """Every answer that hands out a lease's secret is in the audit trail: the grant as
    lease.granted, each replay of its request_id as lease.replayed (same lease_id), and the
    replay is not counted again as a granted lease in the metrics."""
    put_keys("free", [("k1", "acct-a")])
    path = tmp_path / "audit.jsonl"
    broker = await start_broker(audit_file=str(path), metrics_listen="127.0.0.1:0")
    client = connect(broker)
    first = await client.lease_key("free", request_id="once")
    again = await client.lease_key("free", request_id="once")
    assert again.lease_id == first.lease_id
    await wait_until(lambda: path.exists() and '"lease.replayed"' in path.read_text())
    records = [json.loads(line) for line in path.read_text().splitlines()]
    leases = [(r["event"], r["decision"], r["lease_id"], r["request_id"])
              for r in records if r["event"].startswith("lease.")]
    assert leases == [("lease.granted", "granted", first.lease_id, "once"),
                      ("lease.replayed", "replayed", first.lease_id, "once")]
    text = (await asyncio.to_thread(
        httpx.get, f"http://127.0.0.1:{broker.metrics_port}/metrics")).text
    assert 'keybroker_leases_total{decision="granted",pool="free",reason=""} 1.0' in text


async def test_reload_keys_rpc_is_one_audit_record_naming_the_operator(start_broker, put_keys,
                                                                         connect, tmp_path):
    """ReloadKeys writes one keys.reloaded record carrying the operator and the RPC, even
    when nothing changed; the broker's own reloads carry neither."""
    put_keys("free", [("k1", "acct-a")])
    path = tmp_path / "audit.jsonl"
    broker = await start_broker(audit_file=str(path))
    await connect(broker, "admin").reload_keys()
    await wait_until(lambda: path.exists() and any(
        json.loads(line).get("rpc") == "ReloadKeys" for line in path.read_text().splitlines()))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    reloads = [r for r in records if r["event"].startswith("keys.reload")]
    assert [(r["event"], r["principal"], r["rpc"], r["total"]) for r in reloads] == [
        ("keys.reloaded", "", "", 1), ("keys.reloaded", "admin", "ReloadKeys", 1)]


def test_audit_command_filters_records(tmp_path):
    """`keybroker audit` prints only the records matching every filter given."""
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "audit.jsonl"
    rows = [{"ts": 1000.0, "event": "lease.granted", "decision": "granted", "principal": "a",
             "pool": "free", "key_id": "free/k1"},
            {"ts": 2000.0, "event": "lease.granted", "decision": "granted", "principal": "b",
             "pool": "free", "key_id": "free/k2"},
            {"ts": 3000.0, "event": "rpc.denied", "decision": "denied", "principal": "b",
             "pool": "paid", "key_id": ""}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    exe = str(Path(sys.executable).parent / "keybroker")

    def run(*args: str) -> list[dict]:
        out = subprocess.run([exe, "audit", str(path), *args], capture_output=True, text=True,
                             check=True).stdout
        return [json.loads(line) for line in out.splitlines()]

    assert [r["ts"] for r in run("--principal", "b")] == [2000.0, 3000.0]
    assert [r["ts"] for r in run("--decision", "granted", "--key", "free/k2")] == [2000.0]
    assert [r["ts"] for r in run("--event", "rpc.")] == [3000.0]
    assert [r["ts"] for r in run("--since", "1970-01-01T00:25", "--until",
                                 "1970-01-01T00:45")] == [2000.0]


async def test_status_command_shows_keys_usage_and_health(start_broker, put_keys, connect):
    """`keybroker status` prints each pool's keys with usage against quota and health."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.support import TOKENS

    put_keys("free", [("k1", "acct-a"), ("k2", "acct-b")])
    broker = await start_broker()
    client = connect(broker)
    for _ in range(3):
        lease = await client.lease_key("free")
    await client.report_usage(lease.lease_id, 401)
    exe = str(Path(sys.executable).parent / "keybroker")
    env = {**os.environ, "KEYBROKER_TOKEN": TOKENS["admin"], "COLUMNS": "160"}
    out = await asyncio.to_thread(subprocess.run, [exe, "status", "--target",
                                                   f"127.0.0.1:{broker.port}"],
                                  capture_output=True, text=True, env=env, check=True)
    text = out.stdout
    assert "pool free (round_robin): 3/100 used today" in text
    assert "2/50" in text and "1/50" in text
    assert "disabled: the provider rejected the key (401)" in text and "healthy" in text
    denied = await asyncio.to_thread(subprocess.run, [exe, "status", "--target",
                                                      f"127.0.0.1:{broker.port}"],
                                     capture_output=True, text=True,
                                     env={**env, "KEYBROKER_TOKEN": TOKENS["nobody"]})
    assert denied.returncode != 0 and "PERMISSION_DENIED" in denied.stderr


async def test_grafana_dashboard_uses_only_metrics_the_broker_exports(start_broker, put_keys,
                                                                      connect):
    """Every metric the shipped Grafana dashboard queries appears on a real broker's /metrics."""
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parent.parent / "deploy" / "grafana" /
                            "keybroker-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    wanted = {m for e in exprs for m in re.findall(r"\b(keybroker_[a-z_]+)", e)}
    assert len(wanted) >= 8
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker(metrics_listen="127.0.0.1:0")
    client = connect(broker)
    lease = await client.lease_key("free")
    await client.complete(lease.lease_id)
    broker.metrics.backend_errors.labels("vault").inc(0)
    broker.metrics.alerts.labels("pool_low").inc(0)
    text = (await asyncio.to_thread(
        httpx.get, f"http://127.0.0.1:{broker.metrics_port}/metrics")).text
    exported = set(re.findall(r"^(keybroker_[a-z_]+)", text, flags=re.M))
    assert wanted <= exported, wanted - exported
