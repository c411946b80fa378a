"""What an operator gets wrong gets one clear line and a documented exit code, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.testing import free_port
from tests.support import POLICY

KEYBROKER = Path(sys.executable).parent / "keybroker"
BASE_ENV = {"KEYBROKER_VAULT_TOKEN": "unused-token", "KEYBROKER_VAULT_TIMEOUT": "0.5",
            "KEYBROKER_STORE_SQLITE_PATH": "state.db"}


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OTEL_"))}
    full.update(env or {})
    return subprocess.run([str(KEYBROKER), *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port a program that is not a broker listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# (name, files to write {name: text}, argv, extra env, exit code, words the one line must hold)
Case = tuple[str, dict[str, str], list[str], dict[str, str], int, list[str]]
GOOD_POLICY = POLICY
CASES: list[Case] = [
    ("config file missing", {}, ["serve", "--config", "nope.toml"], {}, 2,
     ["nope.toml", "no such file"]),
    ("TOML syntax error", {"kb.toml": 'listen = "127.0.0.1:0"\nstore = [oops\n'},
     ["serve", "--config", "kb.toml"], {}, 2, ["kb.toml", "line 2"]),
    ("unknown setting in a pool", {"kb.toml": '[pools.free]\nstratgy = "least_used"\n'},
     ["serve", "--config", "kb.toml"], {}, 2,
     ["kb.toml", "[pools.free]: unknown setting 'stratgy' (did you mean 'strategy'?)"]),
    ("bad choice lists the valid ones", {"kb.toml": '[store]\nbackend = "mongodb"\n'},
     ["serve", "--config", "kb.toml"], {}, 2, ["[store]", "backend", "sqlite, redis"]),
    ("unknown KEYBROKER_ variable", {}, ["serve"], {"KEYBROKER_STORE_BACKND": "redis"}, 2,
     ["KEYBROKER_STORE_BACKND", "did you mean 'KEYBROKER_STORE_BACKEND'"]),
    ("policy_file missing", {"kb.toml": 'listen = "127.0.0.1:0"\npolicy_file = "gone.toml"\n'},
     ["serve", "--config", "kb.toml"], {}, 2, ["policy_file", "gone.toml", "no such file"]),
    ("malformed policy", {"kb.toml": 'listen = "127.0.0.1:0"\npolicy_file = "p.toml"\n',
                          "p.toml": "[[principals]]\nname = 'svc'\ntokn_sha256 = 'ab'\n"},
     ["serve", "--config", "kb.toml"], {}, 2,
     ["policy_file", "p.toml", "principals[0]", "tokn_sha256", "did you mean 'token_sha256'"]),
    ("policy is not TOML", {"kb.toml": 'listen = "127.0.0.1:0"\npolicy_file = "p.toml"\n',
                            "p.toml": "[roles\n"},
     ["serve", "--config", "kb.toml"], {}, 2, ["policy_file", "p.toml", "line 1"]),
    ("no Vault credentials", {"kb.toml": 'listen = "127.0.0.1:0"\n'},
     ["serve", "--config", "kb.toml"], {"KEYBROKER_VAULT_TOKEN": ""}, 2,
     ["vault.token", "no Vault credentials"]),
    ("audit --since yesterday", {"audit.jsonl": '{"ts": 1, "event": "lease.granted"}\n'},
     ["audit", "audit.jsonl", "--since", "yesterday"], {}, 2, ["--since", "yesterday", "1h"]),
    ("audit file without audit records", {"audit.jsonl": '{"level": "info"}\nplain text\n'},
     ["audit", "audit.jsonl"], {}, 1, ["audit.jsonl", "no audit records"]),
    ("audit file missing", {}, ["audit", "missing.jsonl"], {}, 2, ["missing.jsonl"]),
    ("emulator accounts with a misspelt section", {"acc.toml": "[acounts.a]\ncredits = 0\n"},
     ["emulate-openrouter", "--accounts", "acc.toml"], {}, 2, ["acc.toml", "acounts"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_configuration_is_one_line_and_an_exit_code(tmp_path: Path, case: Case) -> None:
    """Each mistake ends the command with one line on stderr naming the file and setting, exit
    status 2 for configuration and 1 for runtime, and no traceback."""
    _, files, argv, env, code, words = case
    for name, text in files.items():
        _write(tmp_path / name, text.replace("{policy}", GOOD_POLICY))
    done = run(argv, tmp_path, {**BASE_ENV, **env})
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert done.returncode == code, output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_a_port_held_by_another_program_is_one_line_and_exit_1(tmp_path: Path,
                                                              held_port: int) -> None:
    """serve on an address another program listens on exits 1 with one line naming the
    address and 'address already in use'."""
    policy = _write(tmp_path / "p.toml", GOOD_POLICY)
    done = run(["serve"], tmp_path, {**BASE_ENV, "KEYBROKER_LISTEN": f"127.0.0.1:{held_port}",
                                     "KEYBROKER_POLICY_FILE": policy,
                                     "KEYBROKER_LOG_LEVEL": "warning"})
    assert "Traceback" not in done.stdout + done.stderr
    assert done.returncode == 1, done.stderr
    assert f"127.0.0.1:{held_port}" in done.stderr
    assert "address already in use" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_second_serve_on_the_same_port_exits_and_the_first_keeps_serving(
        tmp_path: Path) -> None:
    """A second `keybroker serve` on the port of a running one exits 1 naming the address
    ('address already in use') instead of sharing the port; the first still answers."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    policy = _write(tmp_path / "p.toml", GOOD_POLICY)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OTEL_"))}
    env.update(BASE_ENV, KEYBROKER_LISTEN=f"127.0.0.1:{port}", KEYBROKER_POLICY_FILE=policy,
               KEYBROKER_VAULT_ADDR=f"http://127.0.0.1:{free_port()}")
    first = subprocess.Popen([str(KEYBROKER), "serve"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stderr is not None
        for line in first.stderr:
            if "keybroker listening" in line:
                break
        (tmp_path / "second").mkdir()
        done = run(["serve"], tmp_path / "second", {**BASE_ENV,
                                                     "KEYBROKER_LISTEN": f"127.0.0.1:{port}",
                                                     "KEYBROKER_POLICY_FILE": policy})
        assert done.returncode == 1, done.stderr
        assert f"127.0.0.1:{port}" in done.stderr and "address already in use" in done.stderr
        assert "Traceback" not in done.stderr
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING  # no keys: alive
        assert first.poll() is None
    finally:
        first.terminate()
        first.communicate(timeout=30)


def test_version_and_exit_codes_are_documented(tmp_path: Path) -> None:
    """`keybroker --version` prints the version and `keybroker --help` lists the exit codes."""
    version = run(["--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("keybroker "), version
    helptext = run(["--help"], tmp_path).stdout
    assert "Exit status:" in helptext and "2  configuration" in helptext
