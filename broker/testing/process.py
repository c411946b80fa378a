"""``keybroker serve`` as a child process, configured by KEYBROKER_* variables.

    with BrokerProcess(env, log_path=tmp / "broker.log") as broker:
        await broker.wait_serving()
        ...                                    # talk to broker.target
        broker.kill9()                         # or stop(): SIGTERM, then SIGKILL

Used by the crash and fault tests and by the bench's multi-process rows. Its
standard output and error (the broker's log lines) go to a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._util import free_port

__all__ = ["BrokerProcess", "clean_environ", "keybroker_argv"]

_SERVING = health_pb2.HealthCheckResponse.SERVING


def keybroker_argv() -> list[str]:
    """The ``keybroker`` console script of this interpreter (else one on PATH, else ``-c``)."""
    beside = Path(sys.executable).with_name("keybroker")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("keybroker")
    if found:
        return [found]
    return [sys.executable, "-c", "from broker.cli import main; main()"]


def clean_environ() -> dict[str, str]:
    """This process's environment without KEYBROKER_*, VAULT_* and BAO_* variables, so a
    child broker takes its settings only from what the caller passes."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("KEYBROKER_", "VAULT_", "BAO_"))}


class BrokerProcess:
    """One ``keybroker serve`` subprocess listening on ``127.0.0.1:port``.

    Args:
        env: the child's whole environment (see :func:`clean_environ`);
            ``KEYBROKER_LISTEN`` is set from ``port``.
        name: names the process in error messages.
        port: the gRPC port (default: a free one).
        log_path: where its output goes (default: a temporary file removed by ``stop``).
        workers: ``serve --workers N`` (above 1 the process is the supervisor of N workers:
            see :meth:`worker_pids`).
    """

    def __init__(self, env: Mapping[str, str], *, name: str = "broker", port: int | None = None,
                 log_path: Path | None = None, workers: int = 1) -> None:
        self.name = name
        self.workers = workers
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        self._own_log = log_path is None
        if log_path is None:
            fd, raw = tempfile.mkstemp(prefix="kb-broker-", suffix=".log")
            os.close(fd)
            log_path = Path(raw)
        self.log_path = log_path
        self._env = {**env, "KEYBROKER_LISTEN": self.target}
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BrokerProcess:
        """Spawn the process (it is not SERVING yet: see :meth:`wait_serving`)."""
        self._log = self.log_path.open("wb")
        argv = [*keybroker_argv(), "serve"]
        if self.workers != 1:
            argv += ["--workers", str(self.workers)]
        self._proc = subprocess.Popen(argv, env=self._env,
                                      stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT)
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The child process (started)."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log records written so far, parsed (other text skipped). With workers,
        several processes share the output file: a line may hold a record followed by other
        text (seen once, cause not found), so each line is read record by record."""
        decoder, events = json.JSONDecoder(), []
        for line in map(str.strip, self.output().splitlines()):
            at = line.find("{")
            while at != -1:
                try:
                    record, end = decoder.raw_decode(line, at)
                except ValueError:
                    break
                if isinstance(record, dict):
                    events.append(record)
                at = line.find("{", end)
        return events

    async def health(self, service: str = "", timeout: float = 1.0) -> int:
        """The grpc.health.v1 status of ``service`` ("" for the whole server)."""
        async with grpc.aio.insecure_channel(self.target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return int(reply.status)

    def _all_workers_serving(self) -> bool:
        """With workers: the supervisor said every worker has loaded its keys."""
        return self.workers == 1 or "workers serving" in self.output()

    def _check_alive(self, what: str) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited {self.proc.returncode} {what}:\n"
                                 f"{self.output()[-3000:]}")

    def _too_late(self, deadline: float, timeout: float) -> None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{self.name} not SERVING in {timeout}s:\n{self.output()[-3000:]}")

    async def wait_serving(self, timeout: float = 30.0) -> None:
        """Poll grpc.health.v1 until SERVING (keys loaded; with workers: every worker has
        loaded its keys); AssertionError with the log's tail when the process exits or the
        time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("before SERVING")
            try:
                if await self.health() == _SERVING and self._all_workers_serving():
                    return
            except grpc.aio.AioRpcError:
                pass
            self._too_late(deadline, timeout)
            await asyncio.sleep(0.05)

    def wait_serving_blocking(self, timeout: float = 30.0) -> None:
        """:meth:`wait_serving` for callers without an event loop."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("before SERVING")
            with grpc.insecure_channel(self.target) as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == _SERVING and self._all_workers_serving():
                        return
                except grpc.RpcError:
                    pass
            self._too_late(deadline, timeout)
            time.sleep(0.1)

    def worker_pids(self) -> list[int]:
        """The worker processes of a ``--workers N`` supervisor now (its children, Linux)."""
        found: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            try:
                found += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
        return sorted(found)

    def kill9(self) -> None:
        """SIGKILL, and reap it: a crash, with no chance to flush or drain (with workers: the
        supervisor stopped first, its workers killed, then the supervisor: no worker drains on
        its supervisor's death and none is restarted)."""
        if self.workers != 1:
            self.proc.send_signal(signal.SIGSTOP)
        for pid in self.worker_pids() if self.workers != 1 else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (health NOT_SERVING, RPCs drain), SIGKILL after ``grace`` seconds; always
        reaps the process and closes its log. Safe to call twice."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(grace)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
            self._proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
