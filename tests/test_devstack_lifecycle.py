"""`keybroker dev` leaves nothing behind and never starts over a running stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.testing import free_port

KEYBROKER = Path(sys.executable).parent / "keybroker"


def _children(pid: int) -> list[int]:
    """Every process whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_dev(state_dir: Path, port: int) -> tuple[subprocess.Popen[str], int]:
    """`keybroker dev` in its own process group, once it printed its tokens; (proc, bao pid)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OTEL_"))}
    state_dir.mkdir(parents=True, exist_ok=True)
    errors = state_dir.parent / "dev-stderr.log"  # kept apart: the dev stack's own logs
    with errors.open("w") as err:
        proc = subprocess.Popen([str(KEYBROKER), "dev", "--port", str(port), "--state-dir",
                                 str(state_dir)], env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True, start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("admin token"):
            break
    else:
        code = proc.wait()
        proc.stdout.close()
        raise AssertionError(f"dev stack did not start: {code}: {errors.read_text()[-2000:]}")
    bao = [p for p in _children(proc.pid) if "bao" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(bao) == 1
    return proc, bao[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
@pytest.mark.timeout(180)
def test_sigkill_of_dev_leaves_no_child_and_a_second_stack_refuses(tmp_path: Path) -> None:
    """A second `keybroker dev` over the same state folder refuses (exit 1, naming the running
    one's pid and address) without rewriting its policy; after SIGKILL of the first no child
    (bao) is alive 2 s later."""
    port = free_port()
    proc, bao = _start_dev(tmp_path / "state", port)
    try:
        policy = (tmp_path / "state" / "policy.toml").read_bytes()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OTEL_"))}
        second = subprocess.run([str(KEYBROKER), "dev", "--port", str(free_port()),
                                 "--state-dir", str(tmp_path / "state")], env=env,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1, second.stderr
        assert f"pid {proc.pid}" in second.stderr and f"127.0.0.1:{port}" in second.stderr
        assert "Traceback" not in second.stdout + second.stderr
        assert (tmp_path / "state" / "policy.toml").read_bytes() == policy
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        time.sleep(2.0)
        assert not _alive(bao), "bao outlived a SIGKILLed keybroker dev"
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
        if _alive(bao):
            os.kill(bao, signal.SIGKILL)


@pytest.mark.timeout(180)
def test_sighup_stops_dev_cleanly(tmp_path: Path) -> None:
    """SIGHUP to the process group of `keybroker dev` (a closed terminal, `make run`) stops it
    with exit status 0, and its bao server with it."""
    proc, bao = _start_dev(tmp_path / "state", free_port())
    try:
        os.killpg(proc.pid, signal.SIGHUP)
        assert proc.wait(timeout=30) == 0
        time.sleep(0.5)
        assert not _alive(bao)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
        if _alive(bao):
            os.kill(bao, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_dev_on_a_taken_port_is_one_line(tmp_path: Path) -> None:
    """`keybroker dev` on a port another program holds exits 1 with one line naming the
    address, and leaves no bao behind."""
    import socket

    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "OTEL_"))}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        done = subprocess.run([str(KEYBROKER), "dev", "--port", str(port), "--state-dir",
                               str(tmp_path / "s")], env=env, capture_output=True, text=True,
                              timeout=90)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    errors = [x for x in done.stderr.splitlines() if x.startswith("Error:")]
    assert errors == [f"Error: listen: cannot listen on 127.0.0.1:{port}: address already in "
                      "use (another process listens there)"], done.stderr
