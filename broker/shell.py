"""``keybroker exec``, ``lease`` and ``complete``: leased keys for any program and shell script.

``exec`` follows the convention of ``aws-vault exec`` and ``op run``: lease a key, run a
command with the key in its environment (never in argv), renew the lease while it runs,
forward SIGINT/SIGTERM/SIGHUP to it, complete the lease when it exits and return its exit
code. These talk to a running broker with the Python client (``keybroker_client``).

Exit codes (also in the README):
    0..255  ``exec``: the command's own code (128+N when signal N ended it).
    75      no key now (EX_TEMPFAIL; the RetryInfo is printed in words). A command that
            exits 75 under ``exec`` is taken as "never called the provider": its lease
            is refunded (``--unused-exit-code`` picks another code).
    126/127 ``exec``: the command could not be run / was not found (lease refunded).
    1       the broker refused (credentials, permission, unknown pool, unreachable).
    2       bad flags or environment (click's usage error).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import shlex
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keybroker_client import AsyncKeyBrokerClient, Lease, QuotaExhausted, Unavailable
from keybroker_client import BrokerError as ClientError

__all__ = [
    "EXIT_NO_KEY",
    "Connection",
    "ShellError",
    "lease_environment",
    "retry_in_words",
    "run_complete",
    "run_exec",
    "run_lease",
]

CLIENT_VARIABLES = {
    "KEYBROKER_ADDR": "Broker address (host:port) for exec, lease, complete, status, usage.",
    "KEYBROKER_TOKEN": "Bearer token of exec, lease, complete, status, usage and "
                       "keys clear-cooldown (or --token-file; never in argv).",
    "KEYBROKER_CA_FILE": "PEM CA bundle: exec, lease and complete use TLS to the broker.",
    "KEYBROKER_CERT_FILE": "Client certificate (PEM) for mTLS, with KEYBROKER_KEY_FILE.",
    "KEYBROKER_KEY_FILE": "Client private key (PEM) for mTLS, with KEYBROKER_CERT_FILE.",
    "KEYBROKER_LEASE_ID": "The lease `keybroker complete` ends when no LEASE_ID is given.",
}
"""Variables the client commands read from the environment (docs/configuration.md lists them)."""

EXIT_NO_KEY = 75
"""EX_TEMPFAIL (sysexits.h): no key now, try again later; nothing was spent."""
EXIT_BROKER = 1
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127
DEFAULT_ADDR = "127.0.0.1:50051"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

Echo = Callable[[str], None]


class ShellError(Exception):
    """A refusal to print as one line and exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass(frozen=True)
class Connection:
    """Where the broker is and how to authenticate, from flags and the environment.

    Attributes:
        addr: ``host:port`` (KEYBROKER_ADDR; KEYBROKER_TARGET is read too).
        token: the bearer token (KEYBROKER_TOKEN or a token file; never argv).
        ca_file: PEM CA bundle for TLS (KEYBROKER_CA_FILE); plaintext without it.
        cert_file, key_file: client certificate and key for mTLS (KEYBROKER_CERT_FILE,
            KEYBROKER_KEY_FILE).
    """

    addr: str
    token: str
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, addr: str = "", token_file: str = "",
                 ) -> Connection:
        """Build from flags (when given) and ``env``; raise ShellError(2) when incomplete."""
        token = (Path(token_file).read_text(encoding="utf-8").strip() if token_file
                 else env.get("KEYBROKER_TOKEN", "").strip())
        conn = cls(addr=addr or env.get("KEYBROKER_ADDR") or env.get("KEYBROKER_TARGET")
                   or DEFAULT_ADDR,
                   token=token, ca_file=env.get("KEYBROKER_CA_FILE", ""),
                   cert_file=env.get("KEYBROKER_CERT_FILE", ""),
                   key_file=env.get("KEYBROKER_KEY_FILE", ""))
        if not conn.token and not conn.cert_file:
            raise ShellError("set KEYBROKER_TOKEN (after `make run`: source .keybroker/env) "
                             "or --token-file; the token never goes in argv", 2)
        if bool(conn.cert_file) != bool(conn.key_file):
            raise ShellError("KEYBROKER_CERT_FILE and KEYBROKER_KEY_FILE go together", 2)
        for name, path in (("KEYBROKER_CA_FILE", conn.ca_file),
                           ("KEYBROKER_CERT_FILE", conn.cert_file),
                           ("KEYBROKER_KEY_FILE", conn.key_file)):
            if path and not Path(path).is_file():
                raise ShellError(f"{name}={path}: no such file", 2)
        return conn

    def client(self) -> AsyncKeyBrokerClient:
        """An async client for this connection (TLS when a CA file is set)."""
        return AsyncKeyBrokerClient(
            self.addr, token=self.token or None, root_certificates=self.ca_file or None,
            client_cert=self.cert_file or None, client_key=self.key_file or None)


@dataclass(frozen=True)
class LeaseRequest:
    """What ``exec`` and ``lease`` ask for."""

    pool: str
    model: str = ""
    priority: str = "normal"
    units: int = 1
    ttl: float | None = None


def _duration_words(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"


def retry_in_words(retry_after: float, now: float) -> str:
    """``retry in 3 h 12 min (at 00:00 UTC)``: RetryInfo for a person."""
    at = dt.datetime.fromtimestamp(now + retry_after, dt.UTC)
    return f"retry in {_duration_words(retry_after)} (at {at:%H:%M:%S} UTC)"


def _no_key_line(pool: str, exc: QuotaExhausted, now: float) -> str:
    why = "; ".join(v.description for v in exc.violations[:3] if v.description)
    return (f"no key in pool {pool!r} now{': ' + why if why else ''}; "
            f"{retry_in_words(exc.retry_after, now)}")


def _refusal(exc: ClientError) -> ShellError:
    return ShellError(f"{exc.code.name}: {exc.message}", EXIT_BROKER)


async def _lease(client: AsyncKeyBrokerClient, req: LeaseRequest, *, wait: bool,
                 max_wait: float, echo: Echo) -> Lease:
    """Lease once, or with ``wait`` retry after each RetryInfo (up to ``max_wait`` s, 0: no cap)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        try:
            return await client.lease_key(req.pool, req.model, units=req.units,
                                          priority=req.priority, ttl=req.ttl)
        except QuotaExhausted as exc:
            line = _no_key_line(req.pool, exc, dt.datetime.now(dt.UTC).timestamp())
            delay = max(exc.retry_after, 1.0)
            if not wait or (max_wait and loop.time() - started + delay > max_wait):
                raise ShellError(line, EXIT_NO_KEY) from None
            echo(f"{line}; waiting (--wait)")
        except Unavailable as exc:
            if not wait or (max_wait and loop.time() - started + 1.0 > max_wait):
                raise _refusal(exc) from None
            echo(f"broker unavailable ({exc.message}); retrying in 1 s (--wait)")
            delay = 1.0
        except ClientError as exc:
            raise _refusal(exc) from None
        await asyncio.sleep(delay)


def lease_environment(lease: Lease) -> dict[str, str]:
    """The variables a leased key becomes: what OpenAI/OpenRouter SDKs and curl scripts read."""
    env = {"OPENROUTER_API_KEY": lease.api_key, "OPENAI_API_KEY": lease.api_key,
           "OPENAI_BASE_URL": lease.base_url, "OPENROUTER_BASE_URL": lease.base_url,
           "KEYBROKER_LEASE_ID": lease.lease_id, "KEYBROKER_KEY_ID": lease.key_id}
    if lease.model:
        env["KEYBROKER_MODEL"] = lease.model
    return env


async def _renew_until_cancelled(client: AsyncKeyBrokerClient, lease: Lease,
                                 ttl: float | None, echo: Echo) -> None:
    """Renew at a third of the remaining TTL so a long command keeps its lease."""
    expires = lease.expires_at
    while True:
        left = ((expires - dt.datetime.now(dt.UTC)).total_seconds() if expires else 60.0)
        await asyncio.sleep(max(left / 3, 0.5))
        try:
            expires = await client.renew(lease.lease_id, ttl)
        except ClientError as exc:
            echo(f"keybroker: could not renew lease {lease.lease_id}: {exc.code.name}: "
                 f"{exc.message}")
            return


async def run_exec(conn: Connection, req: LeaseRequest, command: Sequence[str], *,
                   wait: bool = False, max_wait: float = 0.0,
                   unused_exit_code: int = EXIT_NO_KEY, echo: Echo) -> int:
    """Lease, run ``command`` with the key in its environment, complete; return its exit code."""
    async with conn.client() as client:
        lease = await _lease(client, req, wait=wait, max_wait=max_wait, echo=echo)
        env = {**os.environ, **lease_environment(lease)}
        try:
            proc = await asyncio.create_subprocess_exec(*command, env=env)
        except (FileNotFoundError, PermissionError, OSError) as exc:
            await _complete_quietly(client, lease, used=False, echo=echo)
            code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_RUN
            raise ShellError(f"cannot run {command[0]!r}: {exc.strerror or exc} "
                             "(lease refunded)", code) from None
        loop = asyncio.get_running_loop()

        def forward(sig: signal.Signals) -> None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, forward, sig)
        renewer = asyncio.create_task(_renew_until_cancelled(client, lease, req.ttl, echo))
        try:
            rc = await proc.wait()
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            for sig in FORWARDED_SIGNALS:
                loop.remove_signal_handler(sig)
        await _complete_quietly(client, lease, used=rc != unused_exit_code, echo=echo)
    return rc if rc >= 0 else 128 - rc


async def _complete_quietly(client: AsyncKeyBrokerClient, lease: Lease, *, used: bool,
                            echo: Echo) -> None:
    """Complete; a failure is a warning, since the command's own exit code matters more."""
    try:
        await client.complete(lease.lease_id, used=used)
    except ClientError as exc:
        echo(f"keybroker: could not complete lease {lease.lease_id}: {exc.code.name}: "
             f"{exc.message}")


def _lease_record(lease: Lease) -> dict[str, Any]:
    return {"lease_id": lease.lease_id, "key_id": lease.key_id, "api_key": lease.api_key,
            "base_url": lease.base_url, "model": lease.model, "account": lease.account,
            "expires_at": lease.expires_at.isoformat() if lease.expires_at else None,
            "remaining_key_today": lease.remaining_key_today,
            "remaining_account_today": lease.remaining_account_today}


async def run_lease(conn: Connection, req: LeaseRequest, *, as_env: bool, wait: bool = False,
                    max_wait: float = 0.0, echo: Echo) -> str:
    """Lease and return what to print: JSON, or ``export`` lines for ``eval``."""
    async with conn.client() as client:
        lease = await _lease(client, req, wait=wait, max_wait=max_wait, echo=echo)
    if as_env:
        return "\n".join(f"export {name}={shlex.quote(value)}"
                         for name, value in lease_environment(lease).items())
    return json.dumps(_lease_record(lease))


async def run_complete(conn: Connection, lease_id: str, *, used: bool,
                       http_status: int = 0) -> str:
    """Report ``http_status`` (when given) and complete ``lease_id``; return one line."""
    async with conn.client() as client:
        try:
            if http_status:
                await client.report_usage(lease_id, http_status)
            reply = await client.complete(lease_id, used=used)
        except ClientError as exc:
            raise _refusal(exc) from None
    return f"completed {lease_id} ({'refunded' if reply.refunded else 'used'})"
