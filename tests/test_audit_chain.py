"""The tamper-evident audit trail: hash-chained lines, rotation that continues the chain,
Vault Transit HMAC checkpoints, and `keybroker audit verify` naming the first bad record."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import hvac
import pytest

from broker.audit import AuditEvent, AuditFile, rotated_files, verify_chain
from broker.config import VaultSettings
from broker.errors import BackendUnavailable
from broker.vault import (
    TransitHmac,
    VaultAdmin,
    VaultSession,
    broker_policy_hcl,
    operator_policy_hcl,
)

KEYBROKER = Path(sys.executable).with_name("keybroker")


def verify(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KEYBROKER), "audit", "verify", *args], capture_output=True,
                          text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


def write_trail(path: Path, n: int, rotate_bytes: int = 0) -> None:
    trail = AuditFile(path, rotate_bytes)
    for i in range(n):
        trail(AuditEvent.LEASE_GRANTED, {"decision": "granted", "principal": f"svc-{i}",
                                         "pool": "free", "key_id": "free/k1"})
    trail.close()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_an_untouched_trail_verifies(tmp_path):
    """Every line of a fresh trail chains to the one before: verify says ok and counts them."""
    path = tmp_path / "audit.jsonl"
    write_trail(path, 10)
    records = [json.loads(x) for x in lines(path)]
    assert [r["seq"] for r in records] == list(range(1, 11))
    assert records[0]["prev"] == "0" * 64
    assert records[3]["prev"] == hashlib.sha256(lines(path)[2].rstrip("\n").encode()).hexdigest()
    done = verify(str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: 10 record(s) in 1 file(s)")


def test_an_altered_record_is_named(tmp_path):
    """Changing one field of record 5 fails verify at line 5, saying it was altered."""
    path = tmp_path / "audit.jsonl"
    write_trail(path, 10)
    text = lines(path)
    text[4] = text[4].replace('"svc-4"', '"svc-x"')
    path.write_text("".join(text))
    done = verify(str(path))
    assert done.returncode == 1
    assert f"{path}:5: record 5 was altered" in done.stderr


def test_a_removed_record_is_named(tmp_path):
    """Deleting record 4 fails verify at line 4, naming the record removed."""
    path = tmp_path / "audit.jsonl"
    write_trail(path, 10)
    text = lines(path)
    del text[3]
    path.write_text("".join(text))
    done = verify(str(path))
    assert done.returncode == 1
    assert f"{path}:4: record 4 removed" in done.stderr


def test_removing_the_first_records_is_named(tmp_path):
    """Deleting the first two records fails verify at line 1; --partial accepts a trail whose
    start was deleted on purpose."""
    path = tmp_path / "audit.jsonl"
    write_trail(path, 6)
    path.write_text("".join(lines(path)[2:]))
    done = verify(str(path))
    assert done.returncode == 1
    assert f"{path}:1: does not begin the trail (its first record is 3)" in done.stderr
    assert verify("--partial", str(path)).returncode == 0


def test_reordered_records_are_named(tmp_path):
    """Swapping records 6 and 7 fails verify at line 6, saying record 6 is out of order and
    where it is."""
    path = tmp_path / "audit.jsonl"
    write_trail(path, 10)
    text = lines(path)
    text[5], text[6] = text[6], text[5]
    path.write_text("".join(text))
    done = verify(str(path))
    assert done.returncode == 1
    assert f"{path}:6: records are out of order: record 6 should be here but is at {path}:7" \
        in done.stderr


def test_rotation_and_restarts_continue_the_chain(tmp_path):
    """A trail rotated by size into several files, and reopened by a restarted broker,
    verifies as one chain when its files are given oldest first; a file alone does not
    begin the trail unless --partial says so."""
    path = tmp_path / "audit.jsonl"
    write_trail(path, 30, rotate_bytes=2000)
    write_trail(path, 30, rotate_bytes=2000)  # a restart: same file, chain continues
    files = [*rotated_files(path), path]
    assert len(files) >= 4
    count, _, broken = verify_chain(files)
    assert broken is None and count == 60
    assert all(p.stat().st_size <= 2000 for p in files)
    done = verify(*map(str, files))
    assert done.returncode == 0 and done.stdout.startswith(f"ok: 60 record(s) in {len(files)}")
    alone = verify(str(path))
    assert alone.returncode == 1 and "does not begin the trail" in alone.stderr
    assert verify("--partial", str(path)).returncode == 0
    missing = verify(*map(str, files[:1] + files[2:]))  # one rotated file left out
    assert missing.returncode == 1 and f"{files[2]}:1: " in missing.stderr
    assert "removed" in missing.stderr


def test_verify_of_a_file_that_is_not_a_trail_says_so(tmp_path):
    """A line that is not JSON, or an unchained record, is named; a missing file is a
    usage error."""
    path = tmp_path / "audit.jsonl"
    write_trail(path, 3)
    path.write_text(path.read_text() + "garbage\n")
    done = verify(str(path))
    assert done.returncode == 1 and f"{path}:4: not a JSON record" in done.stderr
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"event": "lease.granted"}\n')
    assert "no `prev` and `seq`" in verify(str(plain)).stderr
    absent = verify(str(tmp_path / "nope.jsonl"))
    assert absent.returncode == 2 and "does not exist" in absent.stderr


def _token_with(bao_root: hvac.Client, policy: str, hcl: str = "") -> str:
    """A token holding ``policy`` (written from ``hcl`` first when given)."""
    if hcl:
        bao_root.sys.create_or_update_policy(name=policy, policy=hcl)
    return str(bao_root.auth.token.create(policies=[policy], ttl="1h")["auth"]["client_token"])


async def test_checkpoints_hmac_the_chain_in_vault_and_catch_a_rewritten_trail(
        tmp_path, bao, vault_settings, start_broker, put_keys, connect):
    """A broker on the bootstrap's broker policy writes a checkpoint HMAC'd by Vault Transit;
    verify --check-hmac (operator policy) accepts the trail, and a trail whose record was
    altered with every later hash recomputed passes the chain check but fails the HMAC."""
    root = hvac.Client(url=bao.addr, token=bao.root_token)
    put_keys("free", [("k1", "")])
    own = vault_settings.key_prefix  # the broker policy text for this test's key prefix
    broker_vault = VaultSettings(addr=bao.addr, key_prefix=own, reload_interval=3600.0,
                                 token=_token_with(root, f"broker-{own}",
                                                   broker_policy_hcl(vault_settings)))
    path = tmp_path / "audit.jsonl"
    broker = await start_broker(vault=broker_vault, audit_file=str(path),
                                audit_checkpoint_seconds=0)
    client = connect(broker)
    for _ in range(3):
        await client.lease_key("free")
    assert await broker.audit_checkpoint() is True
    assert await broker.audit_checkpoint() is False  # nothing new since
    await client.lease_key("free")
    records = [json.loads(x) for x in lines(path)]
    checkpoint = next(r for r in records if r["event"] == "audit.checkpoint")
    assert checkpoint["hmac"].startswith("vault:v1:") and checkpoint["records"] >= 3

    env = {"KEYBROKER_VAULT_ADDR": bao.addr,
           "KEYBROKER_VAULT_TOKEN": _token_with(root, f"operator-{own}",
                                                operator_policy_hcl(vault_settings))}
    done = verify("--check-hmac", str(path), env=env)
    assert done.returncode == 0, done.stderr
    assert "1 checkpoint(s) HMAC-verified" in done.stdout

    # Rewrite history without the key: alter the first lease record, recompute the chain.
    text = [x.rstrip("\n") for x in lines(path)]
    first = next(i for i, x in enumerate(text) if '"lease.granted"' in x)
    out, prev = [], "0" * 64
    for i, line in enumerate(text):
        record = json.loads(line)
        if i == first:
            record["principal"] = "someone-else"
        record["prev"] = prev
        line = json.dumps(record, sort_keys=True)
        out.append(line)
        prev = hashlib.sha256(line.encode()).hexdigest()
    path.write_text("\n".join(out) + "\n")
    assert verify(str(path)).returncode == 0  # the chain alone cannot tell
    done = verify("--check-hmac", str(path), env=env)
    assert done.returncode == 1
    line_no = next(i for i, r in enumerate(records, 1) if r["event"] == "audit.checkpoint")
    assert f"{path}:{line_no}: the checkpoint's HMAC does not match" in done.stderr


@pytest.mark.parametrize("policy", ["broker", "operator"])
def test_the_bootstrap_policies_grant_audit_hmac_to_whom_it_belongs(policy, bao):
    """The broker policy `vault bootstrap` writes may HMAC audit checkpoints but not verify;
    the operator policy may verify but not HMAC."""
    root = hvac.Client(url=bao.addr, token=bao.root_token)
    name = VaultAdmin.BROKER_POLICY if policy == "broker" else VaultAdmin.OPERATOR_POLICY
    session = VaultSession(VaultSettings(addr=bao.addr, token=_token_with(root, name)))
    mac = TransitHmac(VaultSession(VaultSettings(addr=bao.addr, token=bao.root_token))
                      ).hmac(b"head")
    hmac = TransitHmac(session)
    if policy == "broker":
        assert hmac.hmac(b"head").startswith("vault:v1:")
        with pytest.raises(BackendUnavailable):
            hmac.verify(b"head", mac)
    else:
        assert hmac.verify(b"head", mac) and not hmac.verify(b"tail", mac)
        with pytest.raises(BackendUnavailable):
            hmac.hmac(b"head")


def test_audit_records_reach_the_log_configured_after_the_audit_was_made(tmp_path):
    """The audit trail's log line goes to whatever structlog is configured with at the time
    of the record, also when it was configured anew after the Audit was made and used."""
    from structlog.testing import capture_logs

    from broker.audit import Audit

    audit = Audit()
    audit.record(AuditEvent.LEASE_GRANTED, decision="granted", principal="svc-a")
    with capture_logs() as logs:
        audit.record(AuditEvent.LEASE_GRANTED, decision="granted", principal="svc-b")
    assert [(x["event"], x["principal"], x["audit"]) for x in logs] == [
        ("lease.granted", "svc-b", True)]


def test_a_record_orjson_cannot_encode_is_still_written_and_chained(tmp_path, log_lines):
    """A field beyond what the fast JSON encoder takes (an integer past 64 bits) is written
    by the standard one: the record is in the file, in the JSON log, and the chain verifies."""
    from broker.audit import Audit

    path = tmp_path / "audit.jsonl"
    trail = AuditFile(path)
    Audit(sinks=[trail]).record(AuditEvent.LEASE_REPORTED, decision="reported",
                                principal="svc-a", prompt_tokens=2**70)
    trail.close()
    assert [json.loads(x)["prompt_tokens"] for x in lines(path)] == [2**70]
    assert [x["prompt_tokens"] for x in log_lines() if x["event"] == "lease.reported"] == [2**70]
    done = verify(str(path))
    assert done.returncode == 0, done.stderr


def test_an_object_with_a_hidden_secret_stays_hidden_in_log_and_audit_lines(tmp_path,
                                                                             log_lines):
    """A dataclass whose secret field is kept out of its repr (settings with a Vault token)
    is written as its repr in the JSON log and in the audit file: the secret appears in
    neither."""
    from broker.audit import Audit
    from broker.config import VaultSettings

    path = tmp_path / "audit.jsonl"
    trail = AuditFile(path)
    vault = VaultSettings(token="hvs.do-not-log-me")
    Audit(sinks=[trail]).record(AuditEvent.KEYS_RELOADED, decision="reloaded", source=vault)
    structlog_line = [x for x in log_lines() if x["event"] == "keys.reloaded"]
    trail.close()
    assert len(structlog_line) == 1 and "VaultSettings(" in structlog_line[0]["source"]
    assert "do-not-log-me" not in log_lines.raw.getvalue()
    assert "do-not-log-me" not in path.read_text()
    assert "VaultSettings(" in json.loads(lines(path)[0])["source"]


def test_log_and_audit_lines_stay_ascii_whatever_the_fields_hold(tmp_path, log_lines):
    """A field with non-ASCII text (a caller's model name, an error message) is escaped
    as \\uXXXX in the JSON log and the audit file, as before, so a log stream or terminal
    that is not UTF-8 can take every line; the value reads back unchanged."""
    from broker.audit import Audit

    path = tmp_path / "audit.jsonl"
    trail = AuditFile(path)
    text = "caf\u00e9 \u2615 \u2028 model"
    Audit(sinks=[trail]).record(AuditEvent.LEASE_REPORTED, decision="reported", reason=text)
    trail.close()
    raw_log = log_lines.raw.getvalue()
    assert raw_log.isascii() and path.read_bytes().isascii()
    assert [x["reason"] for x in log_lines() if x["event"] == "lease.reported"] == [text]
    assert json.loads(lines(path)[0])["reason"] == text
    assert verify(str(path)).returncode == 0
