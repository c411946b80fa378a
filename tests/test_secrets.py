"""Key secrets never reach disk, logs or error messages."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
from keybroker_client import BrokerError

from broker.config import QuotaSettings
from broker.logging import configure_logging


async def test_no_secret_in_logs_sqlite_or_errors(start_broker, put_keys, connect, tmp_path,
                                                  capfd):
    """After leases, reports, refusals and admin calls, no secret appears in anything written."""
    log_file = tmp_path / "broker.log"
    with log_file.open("w") as stream:
        configure_logging("debug", "json", stream=stream)
        secrets_ = put_keys("free", [("k1", "acct-a"), ("k2", "acct-b"), ("k3", "")])
        broker = await start_broker(quota=QuotaSettings(daily_limit=3, minute_limit=100))
        client, admin = connect(broker), connect(broker, "admin")
        errors: list[str] = []
        seen_secrets = set()
        for i in range(12):
            try:
                lease = await client.lease_key("free", request_id=f"r{i % 5}")
                seen_secrets.add(lease.api_key)
                await client.report_usage(lease.lease_id, (200, 429, 401, 502)[i % 4],
                                          ratelimit_remaining=0)
                await client.complete(lease.lease_id, used=bool(i % 2))
            except BrokerError as exc:
                errors.append(f"{exc!r} {exc.message} {exc.reason}")
        for bad in (lambda: client.lease_key("free", units=-1),
                    lambda: admin.get_key("free/nope"),
                    lambda: connect(broker, "nobody").lease_key("free")):
            try:
                await bad()
            except BrokerError as exc:
                errors.append(f"{exc!r} {exc.message}")
        listing = [k.SerializeToString() for k in await admin.list_keys()]
        await admin.set_key_enabled("free/k1", False, reason="test")
        await admin.reload_keys()
        await broker.stop(0)
    assert seen_secrets <= set(secrets_.values()) and seen_secrets, "the test leased real keys"
    captured = capfd.readouterr()
    written = [log_file.read_bytes(), captured.out.encode(), captured.err.encode(),
               "\n".join(errors).encode(), *listing]
    written += [Path(path).read_bytes() for path in glob.glob(str(tmp_path / "state.db*"))]
    assert len(written) >= 6
    for secret in secrets_.values():
        for blob in written:
            assert secret.encode() not in blob
    assert b"lease.granted" in written[0], "the log was really captured"
    structlog_reset()


def structlog_reset() -> None:
    import structlog

    structlog.reset_defaults()


def test_secret_repr_hides_the_value():
    """A Secret's repr and str are masked and it refuses to be pickled."""
    import pickle

    from broker.models import Key, Secret

    s = Secret("sk-or-v1-abcdef")
    key = Key(pool="p", name="n", account="a", secret=s)
    assert "abcdef" not in repr(s) and "abcdef" not in str(s) and "abcdef" not in repr(key)
    with pytest.raises(TypeError):
        pickle.dumps(s)
