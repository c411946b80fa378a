"""A whole local stack in one ``async with``: what ``keybroker dev`` and ``keybroker demo`` run.

    async with DevStack(state_dir, keys=DEV_KEYS, listen="127.0.0.1:50051") as stack:
        stack.caller_token, stack.operator_token   # may lease from pool "free" / may do anything
        stack.emulator.base_url                     # the keys' provider
        stack.broker.port

In order: an OpenBao dev server, bootstrapped like ``keybroker vault bootstrap`` (or a
Vault the caller already bootstrapped), the OpenRouter emulator holding one
emulator credential per key, those keys put into Vault with the emulator as their
``base_url``, a policy with a caller and an operator token, and a broker on SQLite
in ``state_dir``. Leaving the block stops them in reverse order.

This module is where the dev tools meet the composition root (:class:`broker.runtime.Broker`);
nothing in the service imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from ..auth import new_token
from ..clock import Clock
from ..config import (
    LeaseSettings,
    OpenRouterSettings,
    QuotaSettings,
    Settings,
    StoreSettings,
    VaultSettings,
)
from ..errors import StartError
from ..runtime import Broker
from ..vault import VaultAdmin, VaultSession
from .emulator import Emulator
from .openbao import BaoDevServer
from .policy import PolicyBuilder

__all__ = ["DEV_KEYS", "DevStack"]

DEV_KEYS: tuple[tuple[str, str], ...] = (
    ("demo-a1", "acct-a"), ("demo-a2", "acct-a"), ("demo-b1", "acct-b"), ("demo-c1", "acct-c"))
"""(key name, account): the keys ``keybroker dev`` puts into pool ``free``."""


def dev_policy(caller: str, operator: str, pool: str = "free") -> PolicyBuilder:
    """``demo-caller`` may call KeyBroker on ``pool``; ``demo-operator`` may call anything."""
    return (PolicyBuilder()
            .role("consumer", rpcs=["KeyBroker/*"], pools=[pool])
            .role("admin", rpcs=["*"], pools=["*"])
            .principal("demo-caller", caller, roles=["consumer"])
            .principal("demo-operator", operator, roles=["admin"]))


class DevStack:
    """OpenBao (or a given Vault), the OpenRouter emulator, keys in Vault, a policy and a broker.

    Args:
        state_dir: where the policy file and the SQLite state go (created if missing).
        keys: (name, account) of each key put into ``pool``.
        pool: the pool the keys go to and the caller may lease from.
        listen: the broker's gRPC address.
        vault: a bootstrapped Vault to use instead of starting an OpenBao dev server.
        clock: shared by the broker and the emulator (default: the system clock).
        seed: the emulator's seed for injected failures.
        reload_interval: seconds between the broker's key reloads from Vault.
        sweep_interval: seconds between the broker's expired-lease sweeps.
        probe_interval: seconds between key probes (0: none in the background).
        tracing: build a tracer provider from the OTEL_* environment (as ``serve`` does).
        stop_grace: seconds the broker drains in-flight RPCs when the stack stops.
        caller_token, operator_token: the demo tokens (default: new ones), e.g. the ones a
            previous run wrote to ``env_file``, so a shell that sourced it keeps working.
        lock: hold ``state_dir/dev.lock`` (flock) while running, so a second stack over the
            same folder refuses to start (a StartError naming the running one's pid and
            address) before it touches anything there.
    """

    def __init__(self, state_dir: str | Path, *, keys: Sequence[tuple[str, str]] = DEV_KEYS,
                 pool: str = "free", listen: str = "127.0.0.1:0",
                 vault: VaultSettings | None = None, clock: Clock | None = None,
                 seed: int | None = None, reload_interval: float = VaultSettings.reload_interval,
                 sweep_interval: float = LeaseSettings.sweep_interval,
                 probe_interval: float = 30.0, tracing: bool = True,
                 stop_grace: float = 5.0, caller_token: str = "",
                 operator_token: str = "", lock: bool = False) -> None:
        self.state_dir = Path(state_dir)
        self._lock = lock
        self._lock_fd = -1
        self.keys = tuple(keys)
        self.pool = pool
        self.caller_token = caller_token or new_token()
        self.operator_token = operator_token or new_token()
        self._listen = listen
        self._given_vault = vault
        self._clock = clock
        self._seed = seed
        self._reload_interval = reload_interval
        self._sweep_interval = sweep_interval
        self._probe_interval = probe_interval
        self._tracing = tracing
        self._stop_grace = stop_grace
        self._stack = contextlib.AsyncExitStack()
        self.bao: BaoDevServer | None = None
        self._vault: VaultSettings | None = None
        self._emulator: Emulator | None = None
        self._broker: Broker | None = None

    @property
    def vault(self) -> VaultSettings:
        """The Vault the keys are in."""
        if self._vault is None:
            raise RuntimeError("the dev stack is not running")
        return self._vault

    @property
    def emulator(self) -> Emulator:
        if self._emulator is None:
            raise RuntimeError("the dev stack is not running")
        return self._emulator

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            raise RuntimeError("the dev stack is not running")
        return self._broker

    @property
    def policy_file(self) -> Path:
        return self.state_dir / "policy.toml"

    @property
    def sqlite_path(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def audit_file(self) -> Path:
        """The broker's JSON-lines audit file (``keybroker audit`` reads it)."""
        return self.state_dir / "audit.jsonl"

    @property
    def env_file(self) -> Path:
        """Where :meth:`write_env_file` writes the shell variables (``source`` it)."""
        return self.state_dir / "env"

    def environment(self) -> dict[str, str]:
        """What a shell needs to use this stack: broker address, tokens, Vault address and token.

        ``KEYBROKER_TOKEN`` is the caller (pool ``pool``), ``KEYBROKER_ADMIN_TOKEN`` the
        operator; ``VAULT_ADDR``/``VAULT_TOKEN`` make ``keybroker keys`` and ``keybroker
        vault`` work against the dev server.
        """
        return {"KEYBROKER_ADDR": f"127.0.0.1:{self.broker.port}",
                "KEYBROKER_TOKEN": self.caller_token,
                "KEYBROKER_ADMIN_TOKEN": self.operator_token,
                "VAULT_ADDR": self.vault.addr, "VAULT_TOKEN": self.vault.token}

    def write_env_file(self) -> Path:
        """Write :meth:`environment` as ``export`` lines to ``env_file`` (mode 0600), plus the
        folder of this Python's ``keybroker`` (the virtualenv) in front of ``PATH``."""
        import os
        import shlex
        import sys

        bin_dir = shlex.quote(str(Path(sys.executable).parent))
        lines = ["# Written by `keybroker dev`: source this file, then e.g.",
                 "#   keybroker exec --pool free -- python -c '...'",
                 *(f"export {k}={shlex.quote(v)}" for k, v in self.environment().items()),
                 f'export PATH={bin_dir}:"$PATH"']
        fd = os.open(self.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        return self.env_file

    async def start(self) -> DevStack:
        """Start everything; on failure, stop what already started and re-raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "dev.lock"

    def _take_lock(self) -> None:
        """flock ``dev.lock`` (released when this process ends, however it ends) and write our
        pid; a held lock means another stack runs over this folder: say where it is."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").split()
            os.close(fd)
            pid = holder[0] if holder else "?"
            where = holder[1] if len(holder) > 1 else self._listen
            raise StartError(f"a dev stack already runs over {self.state_dir} (pid {pid}, "
                             f"keybroker at {where}): stop it first, or use another "
                             "--state-dir") from None
        self._stack.callback(os.close, fd)
        self._write_lock(fd, self._listen)
        self._lock_fd = fd

    @staticmethod
    def _write_lock(fd: int, address: str) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {address}\n".encode(), 0)

    async def _start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self._lock:
            self._take_lock()
        vault = self._given_vault
        if vault is None:
            bao = BaoDevServer()
            self._stack.callback(bao.close)
            bao.spawn()  # from this (the main) thread: bao dies with the process
            await asyncio.to_thread(bao.wait_ready)
            self.bao = bao
            vault = VaultSettings(addr=bao.addr, token=bao.root_token)
            await asyncio.to_thread(VaultAdmin(VaultSession(vault)).bootstrap)
        self._vault = dataclasses.replace(vault, reload_interval=self._reload_interval)
        dev_policy(self.caller_token, self.operator_token, self.pool).write(self.policy_file)
        # The emulator holds the keys' accounts, so a leased key works against it.
        self._emulator = await self._stack.enter_async_context(
            Emulator(clock=self._clock, seed=self._seed))
        admin = VaultAdmin(VaultSession(self._vault))
        for name, account in self.keys:
            secret = self._emulator.add_key(account, name=name)
            await asyncio.to_thread(admin.put_key, self.pool, name, secret, account=account,
                                    base_url=self._emulator.base_url)
        settings = Settings(
            listen=self._listen, policy_file=str(self.policy_file),
            audit_file=str(self.audit_file),
            store=StoreSettings(sqlite_path=str(self.sqlite_path)), vault=self._vault,
            lease=LeaseSettings(sweep_interval=self._sweep_interval), quota=QuotaSettings(),
            # The emulator's loopback URL is the one provider the dev broker may use.
            openrouter=OpenRouterSettings(probe_interval=self._probe_interval,
                                          allowed_base_urls=(self._emulator.base_url,),
                                          allow_http_loopback=True))
        broker = Broker(settings, clock=self._clock, tracer_provider=True if self._tracing else None)
        await broker.start()
        self._stack.push_async_callback(broker.stop, self._stop_grace)
        self._broker = broker
        if self._lock:
            self._write_lock(self._lock_fd, f"127.0.0.1:{broker.port}")

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the broker has loaded the keys (health SERVING)."""
        async with asyncio.timeout(timeout):
            while not self.broker.engine.ready:
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Stop the broker (draining RPCs), the emulator and the OpenBao dev server."""
        await self._stack.aclose()
        self._broker = self._emulator = None
        self.bao = None

    async def __aenter__(self) -> DevStack:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
