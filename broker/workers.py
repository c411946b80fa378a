"""``keybroker serve --workers N``: N broker processes serving one address.

The supervisor (the ``serve`` process) does no leasing. It:

- proves ``listen`` free with the same check a single broker makes (a bind without
  SO_REUSEPORT), then **holds** the port for the whole run with a bound, non-listening
  SO_REUSEPORT socket. Its workers bind beside it with SO_REUSEPORT and the kernel spreads
  connections over them; anyone else's bind without SO_REUSEPORT (another ``keybroker serve``,
  whose pre-bind check is such a bind, or an unrelated program) fails with "address already
  in use", also while a crashed worker restarts. The held socket never listens, so it never
  takes a connection. (A program of the same user that itself sets SO_REUSEPORT could still
  join: that is what SO_REUSEPORT means on Linux.)
- starts N workers (``keybroker serve`` with ``KEYBROKER_WORKER_SLOT``; worker 1 first, the
  others once it serves, so a bad setting is reported once), each a whole broker
  with its own event loop, on the one store. A worker says it serves by writing one JSON line
  on a pipe (``KEYBROKER_WORKER_FD``); it gets SIGTERM when the supervisor dies.
- restarts a worker that exits (kill -9, a crash) with backoff. A worker that exits 1 or 2
  before serving said why in one line (a bad setting, an unusable file): the supervisor stops
  with that code. One that dies otherwise before serving ``MAX_START_FAILURES`` times in a
  row ends the supervisor with exit 1 and one line.
- on SIGTERM, SIGINT or SIGHUP sends SIGTERM to every worker (each drains its in-flight RPCs
  as a single broker does) and exits 0 once they have; a worker still running after
  ``DRAIN_SECONDS`` is killed.
- serves ``metrics_listen`` itself: each worker serves its metrics on a loopback port of its
  own, and a scrape of the supervisor asks every worker and returns all their series with a
  ``worker`` label (sum them for the broker's totals).

Each worker K > 1 writes its own audit trail, ``audit_file`` with ``.wK`` before the suffix
(``audit.jsonl`` -> ``audit.w2.jsonl``; worker 1 keeps ``audit.jsonl``): one hash chain per
writer, each verified on its own by ``keybroker audit verify``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .config import ConfigError, Settings
from .errors import StartError

__all__ = [
    "DRAIN_SECONDS",
    "FD_ENV",
    "MAX_START_FAILURES",
    "SLOT_ENV",
    "Supervisor",
    "announce",
    "die_with_supervisor",
    "worker_audit_file",
]

log = structlog.get_logger("keybroker")

SLOT_ENV = "KEYBROKER_WORKER_SLOT"
FD_ENV = "KEYBROKER_WORKER_FD"
MAX_START_FAILURES = 5
"""Workers of one slot dying before they serve, in a row, before the supervisor gives up."""
DRAIN_SECONDS = 30.0
"""The longest a stop waits for the workers to drain and exit before killing them (a
worker's own stop is bounded well below this: runtime.STOP_STEP_SECONDS per step)."""
STEADY_SECONDS = 10.0
"""A worker serving this long is healthy again: its slot's restart backoff starts over."""
_PR_SET_PDEATHSIG = 1


class WorkersError(StartError, RuntimeError):
    """The supervisor cannot go on (workers that keep dying at start); one line, exit 1."""


def worker_audit_file(path: str, slot: int) -> str:
    """Worker ``slot``'s audit trail: ``path`` for worker 1, ``stem.wK.suffix`` for K > 1."""
    if not path or slot <= 1:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}.w{slot}{p.suffix}"))


def die_with_supervisor(supervisor_pid: int) -> None:
    """In a worker: SIGTERM when the supervisor dies (Linux), so a SIGKILLed supervisor
    leaves no worker behind; exit at once when it is gone already."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor_pid:
        os._exit(1)


_closed: set[int] = set()


def announce(fd: int, *, close: bool = False, **fields: Any) -> None:
    """In a worker: tell the supervisor something (one JSON line on its pipe): ``port`` once
    it serves the port, ``loaded`` once it has loaded its keys (then ``close``)."""
    if fd in _closed:
        return
    with contextlib.suppress(OSError):
        os.write(fd, json.dumps(fields).encode() + b"\n")
    if close:
        _closed.add(fd)
        with contextlib.suppress(OSError):
            os.close(fd)


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    try:
        return host.strip("[]") or "0.0.0.0", int(port)
    except ValueError:
        raise ConfigError("listen", f"{listen!r}: need host:port") from None


def hold_port(listen: str) -> tuple[socket.socket, str]:
    """Prove ``listen`` free (a bind without SO_REUSEPORT, as a single broker's pre-bind
    check) and hold it: a bound, never listening SO_REUSEPORT socket. Returns the socket and
    the address the workers bind (port 0 resolved). Raises BindError when it is taken."""
    from .runtime import BindError, _bind_problem

    if listen.startswith(("unix:", "unix-abstract:")):
        raise ConfigError("workers", f"more than 1 needs a TCP listen address, not {listen}")
    problem = _bind_problem(listen)
    if problem is not None:
        raise BindError(f"listen: cannot listen on {listen}: {problem}")
    host, port = _split(listen)
    family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port,
                                                          type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    # SO_REUSEPORT without SO_REUSEADDR: a bind that sets only SO_REUSEADDR (the pre-bind
    # check of another broker) conflicts with this socket even while no worker listens.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise BindError(f"listen: cannot listen on {listen}: {exc.strerror or exc}") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return sock, f"{shown}:{bound}"


class _WorkersCollector(Collector):
    """The series of every serving worker's /metrics, each with a ``worker`` label."""

    def __init__(self, ports: Mapping[int, int]) -> None:
        self._ports = ports  # slot -> metrics port, of workers serving now

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for slot, port in sorted(dict(self._ports).items()):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=2.0) as reply:
                    text = reply.read().decode()
            except OSError:
                continue  # it is restarting: its series come back with it
            for family in text_string_to_metric_families(text):
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation,
                                                       family.type, family.unit)
                for sample in family.samples:
                    out.add_sample(sample.name, {**sample.labels, "worker": str(slot)},
                                   sample.value, sample.timestamp, sample.exemplar)
        yield from merged.values()


@dataclass
class _Slot:
    number: int
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False  # bound and serving the port
    loaded: bool = False  # has loaded its keys once (SERVING)
    started_at: float = 0.0
    failures: int = 0  # deaths in a row before serving STEADY_SECONDS
    metrics_port: int | None = None
    restarts: int = 0
    pids: list[int] = field(default_factory=list)


class Supervisor:
    """Runs ``count`` workers of ``settings`` (see the module docstring)."""

    def __init__(self, settings: Settings, count: int, config: str | None) -> None:
        self.settings = settings
        self.count = count
        self._config = config
        self._slots = [_Slot(k) for k in range(1, count + 1)]
        self._stopping = False
        self._fatal: tuple[int, str] | None = None  # (exit code, line; "" if a worker said it)
        self._stop = asyncio.Event()
        self._first_bound = asyncio.Event()
        self._metrics_ports: dict[int, int] = {}
        self._metrics_server: Any = None
        self.address = ""

    def _argv(self) -> list[str]:
        argv = [sys.executable, "-c", "from broker.cli import main; main()", "serve"]
        return [*argv, "--config", self._config] if self._config else argv

    def _env(self, slot: int, fd: int) -> dict[str, str]:
        env = {**os.environ, "KEYBROKER_WORKERS": "1", "KEYBROKER_LISTEN": self.address,
               SLOT_ENV: f"{slot}:{os.getpid()}", FD_ENV: str(fd)}
        env.pop("KEYBROKER_CONFIG", None)  # passed as --config (the same file)
        if self.settings.metrics_listen:
            env["KEYBROKER_METRICS_LISTEN"] = "127.0.0.1:0"
        return env

    async def _spawn(self, slot: _Slot) -> int:
        """Start slot's worker; returns the read end of its announcement pipe."""
        read_fd, write_fd = os.pipe()
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                *self._argv(), env=self._env(slot.number, write_fd), pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL)
        finally:
            os.close(write_fd)
        slot.ready, slot.started_at = False, time.monotonic()
        slot.pids.append(slot.proc.pid)
        log.info("worker.started", slot=slot.number, pid=slot.proc.pid)
        return read_fd

    async def _listen(self, fd: int, heard: Any) -> None:
        """Pass each JSON object the worker writes on its pipe to ``heard``, until the pipe
        closes (the worker closed it, or exited)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
        try:
            async for line in reader:
                with contextlib.suppress(ValueError):
                    said = json.loads(line)
                    if isinstance(said, dict):
                        heard(said)
        finally:
            transport.close()

    def _heard(self, slot: _Slot, proc: asyncio.subprocess.Process, said: dict[str, Any],
               bound: asyncio.Event, loaded: asyncio.Event) -> None:
        if slot.proc is not proc or proc.returncode is not None:
            return
        if said.get("port"):
            slot.ready = True
            if said.get("metrics_port"):
                slot.metrics_port = int(said["metrics_port"])
                self._metrics_ports[slot.number] = slot.metrics_port
            log.info("worker.serving", slot=slot.number, pid=proc.pid)
            self._first_bound.set()
            if all(s.ready for s in self._slots):
                bound.set()
        if said.get("loaded"):
            slot.loaded = True
            if all(s.loaded for s in self._slots):
                loaded.set()

    async def _run_slot(self, slot: _Slot, bound: asyncio.Event, loaded: asyncio.Event) -> None:
        while not self._stopping:
            fd = await self._spawn(slot)
            proc = slot.proc
            assert proc is not None

            def heard(said: dict[str, Any], proc: Any = proc) -> None:
                self._heard(slot, proc, said, bound, loaded)

            reader = asyncio.create_task(self._listen(fd, heard))
            code = await proc.wait()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, 5.0)  # the pipe closed with the worker
            self._metrics_ports.pop(slot.number, None)
            if self._stopping:
                return
            served = slot.ready
            slot.ready = False
            if served and time.monotonic() - slot.started_at >= STEADY_SECONDS:
                slot.failures = 0
            slot.failures += 1
            log.error("worker.exited", slot=slot.number, pid=proc.pid, code=code,
                      served=served, restart=not self._stopping)
            if not served and code in (1, 2) and slot.restarts == 0:
                # It said why in one line (a bad setting or file, a port): every worker would.
                self._give_up(code, "")
                return
            if not served and slot.failures >= MAX_START_FAILURES:
                self._give_up(1, f"workers: worker {slot.number} died {slot.failures} times in "
                                 f"a row before serving (last exit status {code}); see the "
                                 "log lines above")
                return
            slot.restarts += 1
            delay = min(0.25 * 2 ** (slot.failures - 1), 10.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    def _give_up(self, code: int, line: str) -> None:
        if self._fatal is None:
            self._fatal = (code, line)
        self._stop.set()

    def _serve_metrics(self) -> None:
        from .runtime import BindError, _why_not

        listen = self.settings.metrics_listen
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_WorkersCollector(self._metrics_ports))
        host, _, port = listen.rpartition(":")
        try:
            server, _thread = start_http_server(int(port), addr=host or "127.0.0.1",
                                                registry=registry)
        except OSError:
            raise BindError(f"metrics_listen: cannot listen on {listen}: "
                            f"{_why_not(listen)}") from None
        self._metrics_server = server

    async def run(self, on_listening: Any = None, on_serving: Any = None) -> int:
        """Hold the port, run the workers until a stop signal (0) or a fatal start (its
        code); raises BindError / ConfigError before any worker starts. ``on_listening``
        (address) is called once every worker is bound, ``on_serving()`` once every worker
        has loaded its keys (both once, not again after a restart)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._stop.set)
        held, self.address = hold_port(self.settings.listen)
        try:
            if self.settings.metrics_listen:
                self._serve_metrics()
            bound, loaded = asyncio.Event(), asyncio.Event()
            # Worker 1 first: a bad setting or file stops it with one line, said once.
            tasks = [asyncio.create_task(self._run_slot(self._slots[0], bound, loaded))]
            first = asyncio.create_task(self._first_bound.wait())
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait((first, stop), return_when=asyncio.FIRST_COMPLETED)
            first.cancel()
            if not self._stop.is_set():
                tasks += [asyncio.create_task(self._run_slot(s, bound, loaded))
                          for s in self._slots[1:]]

            async def tell() -> None:
                await bound.wait()
                log.info("workers.listening", workers=self.count, listen=self.address)
                if on_listening is not None:
                    on_listening(self.address)
                await loaded.wait()
                log.info("workers.serving", workers=self.count, listen=self.address)
                if on_serving is not None:
                    on_serving()

            telling = asyncio.create_task(tell())
            await stop
            telling.cancel()
            await self._drain(tasks)
        finally:
            held.close()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
        if self._fatal is not None:
            code, line = self._fatal
            if line:
                raise WorkersError(line)
            return code
        return 0

    async def _drain(self, tasks: list[asyncio.Task[None]]) -> None:
        """SIGTERM every worker, wait up to DRAIN_SECONDS, then SIGKILL what is left."""
        self._stopping = True
        began = time.monotonic()
        procs = [s.proc for s in self._slots if s.proc is not None and s.proc.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(p.wait()) for p in procs]
        if waits:
            _done, late = await asyncio.wait(waits, timeout=DRAIN_SECONDS)
            for proc in procs:
                if proc.returncode is None:
                    log.error("worker.kill_after_drain", pid=proc.pid, seconds=DRAIN_SECONDS)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if late:
                await asyncio.wait(late)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("workers.stopped", workers=self.count,
                 seconds=round(time.monotonic() - began, 3))
