"""`keybroker exec`, `lease` and `complete` as real subprocesses against a real broker and the
OpenRouter emulator (a DevStack on the session's OpenBao)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.clock import ManualClock
from broker.config import VaultSettings
from broker.testing import DevStack
from tests.support import T0, wait_until

KEYBROKER = str(Path(sys.executable).parent / "keybroker")

# A chat completion with nothing but the standard library and the variables exec sets.
CHAT = textwrap.dedent("""
    import json, os, urllib.request
    body = {"model": "meta-llama/llama-3.3-70b-instruct:free",
            "messages": [{"role": "user", "content": "hi"}]}
    req = urllib.request.Request(os.environ["OPENAI_BASE_URL"] + "/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + os.environ["OPENROUTER_API_KEY"],
                                          "Content-Type": "application/json"})
    print(json.load(urllib.request.urlopen(req))["choices"][0]["message"]["content"])
""")


@dataclass
class Done:
    rc: int
    out: str
    err: str


@pytest.fixture
async def stack(tmp_path: Path, vault_settings: VaultSettings) -> AsyncIterator[DevStack]:
    async with DevStack(tmp_path / "state", keys=[("k1", "acct-a")], vault=vault_settings,
                        probe_interval=0.0, tracing=False, stop_grace=0.0,
                        clock=ManualClock(T0)) as s:
        await s.wait_ready()
        yield s


def shell_env(stack: DevStack, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "VAULT_"))}
    return {**base, **stack.environment(), **extra}


async def start(stack: DevStack, *args: str, **extra: str) -> asyncio.subprocess.Process:
    # The broker serves on this event loop, so the CLI runs as an asyncio subprocess.
    return await asyncio.create_subprocess_exec(
        KEYBROKER, *args, env=shell_env(stack, **extra), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def run(stack: DevStack, *args: str, **extra: str) -> Done:
    proc = await start(stack, *args, **extra)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


def audit(stack: DevStack, decision: str) -> list[dict[str, object]]:
    lines = stack.audit_file.read_text().splitlines() if stack.audit_file.exists() else []
    return [r for r in map(json.loads, lines) if r.get("decision") == decision]


async def test_exec_makes_a_chat_completion_with_the_leased_key(stack):
    """`keybroker exec --pool free -- python -c CHAT` makes a completion against the emulator,
    returns 0 and completes the lease as used."""
    done = await run(stack, "exec", "--pool", "free", "--", sys.executable, "-c", CHAT)
    assert done.rc == 0, done.err
    assert "emulated answer" in done.out
    assert stack.emulator.free_requests_today("acct-a") == 1
    await wait_until(lambda: len(audit(stack, "completed")) == 1)
    assert audit(stack, "completed")[0]["refunded"] is False


async def test_exec_keeps_the_secret_out_of_its_own_argv_environment_and_logs(stack):
    """The key is only in CMD's environment: not in exec's argv or environment, its output,
    or the broker's audit file."""
    probe = textwrap.dedent("""
        import os
        parent = os.getppid()
        seen = open(f"/proc/{parent}/cmdline", "rb").read() + open(f"/proc/{parent}/environ", "rb").read()
        secret = os.environ["OPENROUTER_API_KEY"].encode()
        assert os.environ["OPENAI_API_KEY"].encode() == secret and len(secret) > 20
        print("parent-has-secret" if secret in seen else "parent-clean", os.environ["KEYBROKER_LEASE_ID"])
        open(os.environ["SECRET_OUT"], "wb").write(secret)
    """)
    out_file = stack.state_dir / "secret.out"
    done = await run(stack, "exec", "--pool", "free", "--", sys.executable, "-c", probe,
                     SECRET_OUT=str(out_file))
    assert done.rc == 0, done.err
    assert done.out.startswith("parent-clean ls_"), done.out
    secret = out_file.read_text()
    assert secret not in done.err and secret not in stack.audit_file.read_text()


async def test_exec_returns_the_command_exit_code_and_refunds_on_the_unused_code(stack):
    """CMD's exit code is exec's; exit 75 from CMD means "never called" and refunds the lease."""
    used = await run(stack, "exec", "--pool", "free", "--", "sh", "-c", "exit 3")
    assert used.rc == 3
    unused = await run(stack, "exec", "--pool", "free", "--", "sh", "-c", "exit 75")
    assert unused.rc == 75
    await wait_until(lambda: len(audit(stack, "completed")) == 2)
    assert [r["refunded"] for r in audit(stack, "completed")] == [False, True]


async def test_exec_of_a_missing_command_exits_127_and_refunds(stack):
    """A command that does not exist: exit 127, one line, the lease refunded."""
    done = await run(stack, "exec", "--pool", "free", "--", "no-such-command-here")
    assert done.rc == 127
    assert "cannot run 'no-such-command-here'" in done.err and "Traceback" not in done.err
    await wait_until(lambda: len(audit(stack, "completed")) == 1)
    assert audit(stack, "completed")[0]["refunded"] is True


async def test_exec_forwards_sigterm_to_the_command(stack):
    """SIGTERM to `keybroker exec` reaches CMD, whose exit code exec returns."""
    child = textwrap.dedent("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(9)))
        print("ready", flush=True)
        time.sleep(30)
    """)
    proc = await start(stack, "exec", "--pool", "free", "--", sys.executable, "-c", child)
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 30)) == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 9, err
    assert out == b"got SIGTERM\n"


async def test_exec_renews_the_lease_while_the_command_runs(stack):
    """A command running past the lease TTL keeps its lease: exec renews it, then completes it."""
    done = await run(stack, "exec", "--pool", "free", "--ttl", "1.5", "--",
                     sys.executable, "-c", "import time; time.sleep(3)")
    assert done.rc == 0, done.err
    assert len(audit(stack, "renewed")) >= 2
    assert audit(stack, "completed") and not audit(stack, "expired")


async def test_exec_with_no_key_exits_75_with_the_retry_time_in_words(stack):
    """With the account's minute spent, exec exits 75 and says when to retry; CMD never runs."""
    held = await run(stack, "lease", "--pool", "free", "--units", "20", "--ttl", "60")
    assert held.rc == 0, held.err
    marker = stack.state_dir / "ran"
    done = await run(stack, "exec", "--pool", "free", "--", "touch", str(marker))
    assert done.rc == 75
    assert "no key in pool 'free' now" in done.err and "retry in 1 min" in done.err, done.err
    assert "Traceback" not in done.err and not marker.exists()


async def test_exec_wait_retries_after_the_retry_info(stack):
    """With --wait, exec waits the RetryInfo and runs CMD once a key frees up."""
    stack_clock = stack._clock  # the ManualClock the stack was given
    assert isinstance(stack_clock, ManualClock)
    stack_clock.advance(59.5)
    assert (await run(stack, "lease", "--pool", "free", "--units", "20")).rc == 0
    proc = await start(stack, "exec", "--pool", "free", "--wait", "--", "echo", "ran")
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), 30)
    assert b"waiting (--wait)" in line, line
    stack_clock.advance(1.0)  # the next minute: the account's minute window is empty again
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    assert out == b"ran\n"


async def test_exec_wait_gives_up_after_max_wait(stack):
    """--wait --max-wait 1 gives up with exit 75 when the retry time is further away."""
    assert (await run(stack, "lease", "--pool", "free", "--units", "20")).rc == 0
    done = await run(stack, "exec", "--pool", "free", "--wait", "--max-wait", "1", "--", "true")
    assert done.rc == 75 and "retry in" in done.err


async def test_lease_env_and_complete_for_shell_scripts(stack):
    """`eval "$(keybroker lease --env)"` sets the key variables; `keybroker complete --unused`
    reads KEYBROKER_LEASE_ID and refunds."""
    script = (f'eval "$({KEYBROKER} lease --pool free --env)" && '
              'test -n "$OPENROUTER_API_KEY" && echo "$OPENAI_BASE_URL" && '
              f'{KEYBROKER} complete --unused')
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", script, env=shell_env(stack), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    base_url, completed = out.decode().splitlines()
    assert base_url == stack.emulator.base_url
    assert completed.startswith("completed ls_") and completed.endswith("(refunded)")


async def test_lease_json_then_complete_with_a_status(stack):
    """`keybroker lease --json` prints the lease; `complete ID --http-status 200` reports and
    completes it as used."""
    leased = await run(stack, "lease", "--pool", "free", "--json")
    record = json.loads(leased.out)
    assert record["key_id"] == "free/k1" and record["base_url"] == stack.emulator.base_url
    done = await run(stack, "complete", record["lease_id"], "--http-status", "200")
    assert done.rc == 0, done.err
    assert done.out.strip() == f"completed {record['lease_id']} (used)"
    assert audit(stack, "reported")


async def test_shell_commands_without_a_token_say_what_to_set(stack):
    """Without KEYBROKER_TOKEN exec exits 2 with one line naming the variable, no traceback."""
    env = {k: v for k, v in shell_env(stack).items() if k != "KEYBROKER_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        KEYBROKER, "exec", "--pool", "free", "--", "true", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert "KEYBROKER_TOKEN" in err.decode() and "Traceback" not in err.decode()


async def test_a_short_token_is_named_as_too_short(stack):
    """A 5-character token is refused as too short, not as a malformed header."""
    done = await run(stack, "exec", "--pool", "free", "--", "true", KEYBROKER_TOKEN="short")
    assert done.rc == 1
    assert "UNAUTHENTICATED: bearer token is 5 characters" in done.err, done.err


async def test_status_reads_keybroker_addr(stack):
    """`keybroker status` finds the broker through KEYBROKER_ADDR, as exec does."""
    done = await run(stack, "status", KEYBROKER_TOKEN=stack.operator_token)
    assert done.rc == 0, done.err
    assert "pool free (round_robin)" in done.out


async def _dev_until_ready(state_dir: Path) -> tuple[asyncio.subprocess.Process, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "VAULT_"))}
    proc = await asyncio.create_subprocess_exec(
        KEYBROKER, "dev", "--port", "0", "--state-dir", str(state_dir), env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    banner = ""
    while "Ctrl-C stops everything" not in banner:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, f"keybroker dev ended early:\n{banner}"
        banner += line.decode()
    return proc, banner


async def _stop(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.wait(), 30)


async def test_dev_writes_an_env_file_that_makes_exec_work(tmp_path):
    """`keybroker dev` writes STATE/env (address, caller and admin tokens, VAULT_ADDR and
    VAULT_TOKEN) and prints the real tokens; sourcing it is all `keybroker exec` needs; the
    audit file fills; a second run keeps the tokens."""
    state = tmp_path / ".keybroker"
    proc, banner = await _dev_until_ready(state)
    try:
        env_file = (state / "env").read_text()
        values = dict(line.removeprefix("export ").split("=", 1) for line in env_file.splitlines()
                      if line.startswith("export "))
        assert set(values) == {"KEYBROKER_ADDR", "KEYBROKER_TOKEN", "KEYBROKER_ADMIN_TOKEN",
                               "VAULT_ADDR", "VAULT_TOKEN", "PATH"}
        assert (state / "env").stat().st_mode & 0o777 == 0o600
        for name in ("KEYBROKER_TOKEN", "KEYBROKER_ADMIN_TOKEN", "VAULT_TOKEN"):
            assert values[name] in banner
        assert f"source {state / 'env'}" in banner
        # Nothing but the env file: `keybroker` and `python` come from the PATH it sets.
        script = f". {state / 'env'} && keybroker exec --pool free -- python -c '{CHAT}'"
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith(("KEYBROKER_", "VAULT_", "VIRTUAL_ENV"))}
        clean["PATH"] = "/usr/bin:/bin"
        sh = await asyncio.create_subprocess_exec(
            "sh", "-c", script, env=clean, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(sh.communicate(), 60)
        assert sh.returncode == 0, err
        assert "emulated answer" in out.decode()
        keys = await asyncio.create_subprocess_exec(
            "sh", "-c", f". {state / 'env'} && keybroker keys list", env=clean,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        listing, err = await asyncio.wait_for(keys.communicate(), 60)
        assert keys.returncode == 0, err
        assert "free/demo-a1" in listing.decode()
    finally:
        await _stop(proc)
    assert any(json.loads(line).get("decision") == "granted"
               for line in (state / "audit.jsonl").read_text().splitlines())
    proc, _ = await _dev_until_ready(state)
    await _stop(proc)
    again = (state / "env").read_text()
    assert f"KEYBROKER_TOKEN={values['KEYBROKER_TOKEN']}" in again
    assert f"KEYBROKER_ADMIN_TOKEN={values['KEYBROKER_ADMIN_TOKEN']}" in again
