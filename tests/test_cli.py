"""The `keybroker` command line, run as a real subprocess against a real OpenBao."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
import secrets
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from broker.auth import Policy, parse_bearer
from broker.config import VaultAuth, VaultSettings
from broker.testing import BaoDevServer, free_port
from broker.vault import DEFAULT_BASE_URL, VaultAdmin, VaultKeySource, VaultSession

KEYBROKER = Path(sys.executable).parent / "keybroker"
ROLE_LINE = re.compile(r"^approle role keybroker: role_id ([0-9a-f-]{36})$", re.M)

LOOPBACK_TEST_URL = "http://127.0.0.1:9/api/v1"  # a base_url the tests' key loads allow


def new_secret() -> str:
    return f"sk-or-v1-test-{secrets.token_hex(20)}"


@dataclass
class Cli:
    """Runs `keybroker` with VAULT_ADDR/VAULT_TOKEN and a key prefix of this test's own."""

    env: dict[str, str]
    settings: VaultSettings

    def __call__(self, *args: str, stdin: str = "", env: Mapping[str, str] | None = None,
                 drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        full = {**self.env, **(env or {})}
        for name in drop:
            full.pop(name, None)
        return subprocess.run([str(KEYBROKER), *args], input=stdin, env=full,
                              capture_output=True, text=True, timeout=60, check=False)

    def root(self) -> hvac.Client:
        return hvac.Client(url=self.settings.addr, token=self.settings.token)

    def admin(self) -> VaultAdmin:
        return VaultAdmin(VaultSession(self.settings))

    async def stored(self, settings: VaultSettings | None = None) -> dict[str, str]:
        """key_id -> decrypted secret, as the broker would load them."""
        keys = await VaultKeySource(VaultSession(settings or self.settings),
                                    allowed_base_urls=(DEFAULT_BASE_URL, LOOPBACK_TEST_URL)).load()
        return {k.key_id: k.secret.reveal() for k in keys}

    def with_transit_key(self, name: str) -> Cli:
        return Cli({**self.env, "KEYBROKER_VAULT_TRANSIT_KEY": name},
                   dataclasses.replace(self.settings, transit_key=name))


@pytest.fixture
def cli(bao: BaoDevServer) -> Cli:
    prefix = f"cli-{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KEYBROKER_", "VAULT_", "BAO_"))}
    env.update(VAULT_ADDR=bao.addr, VAULT_TOKEN=bao.root_token,
               KEYBROKER_VAULT_KEY_PREFIX=prefix)
    return Cli(env, VaultSettings(addr=bao.addr, token=bao.root_token, key_prefix=prefix))


# A structlog console line, e.g. "2026-03-10 12:00:00 [info     ] vault.login  auth=token".
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[\w+ *\] .*\n?", re.M)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a successful command, without log lines (see test_stdout_is_only_...)."""
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return LOG_LINE.sub("", result.stdout)


def refused(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode != 0, result.stdout
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_stdout_is_only_the_command_output(cli):
    """stdout carries only the command's answer (no log lines), so `--json` can be piped to jq."""
    cli.admin().put_key("free", "k1", new_secret())
    listing = cli("keys", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    assert [r["name"] for r in json.loads(listing.stdout)] == ["k1"]
    put = cli("keys", "put", "--pool", "free", "--name", "k2", stdin=new_secret() + "\n")
    assert put.stdout == "stored free/k2 (version 1)\n"


# -- vault bootstrap -------------------------------------------------------------------------


def test_bootstrap_prints_policy_and_role_id_and_is_idempotent(cli):
    """`vault bootstrap` prints the applied broker policy and role_id, and can run twice."""
    first, second = ok(cli("vault", "bootstrap")), ok(cli("vault", "bootstrap"))
    prefix = cli.settings.key_prefix
    for out in (first, second):
        assert "# policy keybroker-broker (applied)" in out
        assert 'path "transit/decrypt/keybroker"' in out
        assert f'path "keybroker/data/{prefix}/*"' in out
        assert f'path "keybroker/metadata/{prefix}"' in out
        assert "transit/encrypt" not in out  # the broker never encrypts
    role_ids = [ROLE_LINE.search(out) for out in (first, second)]
    assert role_ids[0] and role_ids[1] and role_ids[0].group(1) == role_ids[1].group(1)

    root = cli.root()
    applied = root.sys.read_policy(name="keybroker-broker")["data"]["rules"]
    assert applied.strip() in first
    role = root.auth.approle.read_role(role_name="keybroker")["data"]
    assert role["token_policies"] == ["keybroker-broker"]
    assert root.auth.approle.read_role_id(role_name="keybroker")["data"]["role_id"] == \
        role_ids[0].group(1)


async def test_bootstrap_approle_out_writes_private_credentials_that_log_in(cli, tmp_path):
    """`--approle-out` writes a 0600 JSON file whose role_id and secret_id can load keys."""
    out_file = tmp_path / "approle.json"
    result = cli("vault", "bootstrap", "--approle-out", str(out_file))
    out = ok(result)
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
    creds = json.loads(out_file.read_text())
    assert set(creds) == {"role_id", "secret_id"}
    assert ROLE_LINE.search(out).group(1) == creds["role_id"]
    assert creds["secret_id"] not in result.stdout + result.stderr

    login = hvac.Client(url=cli.settings.addr).auth.approle.login(
        role_id=creds["role_id"], secret_id=creds["secret_id"])
    assert "keybroker-broker" in login["auth"]["token_policies"]

    secret = new_secret()
    ok(cli("keys", "put", "--pool", "free", "--name", "k1", stdin=secret + "\n"))
    approle = dataclasses.replace(cli.settings, auth=VaultAuth.APPROLE, token="",
                                  role_id=creds["role_id"], secret_id=creds["secret_id"])
    assert await cli.stored(approle) == {"free/k1": secret}


def test_bootstrap_approle_out_refuses_an_existing_file(cli, tmp_path):
    """`--approle-out` onto an existing file refuses (exit 2) and leaves the file as it was:
    credentials only ever go to a new 0600 file."""
    out_file = tmp_path / "approle.json"
    out_file.write_text("{}")
    out_file.chmod(0o644)
    result = cli("vault", "bootstrap", "--approle-out", str(out_file))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert out_file.read_text() == "{}"


# -- keys put --------------------------------------------------------------------------------


async def test_keys_put_reads_the_secret_from_stdin(cli):
    """`keys put` takes the secret from stdin; it is in neither argv nor the command's output."""
    cli.admin().bootstrap()
    secret = new_secret()
    args = [str(KEYBROKER), "keys", "put", "--pool", "free", "--name", "k1",
            "--account", "acct-a"]
    proc = subprocess.Popen(args, env=cli.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.1)  # the command is up and waiting on stdin
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        out, err = proc.communicate(secret + "\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert b"keys" in argv and not any(secret.encode() in a for a in argv)
    assert LOG_LINE.sub("", out).strip() == "stored free/k1 (version 1)"
    assert secret not in out + err
    assert await cli.stored() == {"free/k1": secret}
    assert [r.account for r in cli.admin().list_keys()] == ["acct-a"]

    rotated = new_secret()
    result = cli("keys", "put", "--pool", "free", "--name", "k1", stdin=rotated + "\n")
    assert ok(result).strip() == "stored free/k1 (version 2)"
    assert rotated not in result.stdout + result.stderr
    assert await cli.stored() == {"free/k1": rotated}


async def test_keys_put_reads_the_secret_from_an_env_var(cli):
    """`keys put --secret-env VAR` takes the secret from $VAR; only the name is in argv."""
    cli.admin().bootstrap()
    secret = new_secret()
    result = cli("keys", "put", "--pool", "paid", "--name", "k2", "--secret-env", "KB_TEST_KEY",
                 env={"KB_TEST_KEY": secret})
    assert ok(result).strip() == "stored paid/k2 (version 1)"
    assert secret not in result.stdout + result.stderr
    assert await cli.stored() == {"paid/k2": secret}


def test_keys_put_refuses_missing_or_malformed_secrets(cli):
    """An empty stdin, a secret with spaces or an unset --secret-env is refused; nothing stored."""
    cli.admin().bootstrap()
    refused(cli("keys", "put", "--pool", "free", "--name", "k1", stdin=""),
            "secret: must be non-empty")
    refused(cli("keys", "put", "--pool", "free", "--name", "k1", stdin="\n"),
            "secret: must be non-empty")
    spaced = "sk-or-v1 has spaces"
    result = cli("keys", "put", "--pool", "free", "--name", "k1", stdin=spaced + "\n")
    refused(result, "secret: must be non-empty without whitespace")
    assert spaced not in result.stderr
    refused(cli("keys", "put", "--pool", "free", "--name", "k1", "--secret-env", "KB_UNSET"),
            "$KB_UNSET is empty or unset")
    refused(cli("keys", "put", "--pool", "free", "--name", "k1", "--secret-env", "KB_EMPTY",
                env={"KB_EMPTY": ""}), "$KB_EMPTY is empty or unset")
    assert cli.admin().list_keys() == []


def test_keys_put_offers_no_way_to_pass_the_secret_in_argv(cli):
    """`keys put` rejects a secret given as an option or argument (usage error, nothing stored)."""
    secret = new_secret()
    refused(cli("keys", "put", "--pool", "free", "--name", "k1", "--secret", secret,
                stdin=new_secret() + "\n"), "No such option")
    refused(cli("keys", "put", "--pool", "free", "--name", "k1", secret,
                stdin=new_secret() + "\n"), "unexpected extra argument")
    assert cli.admin().list_keys() == []


# -- keys list / disable / enable / rm -------------------------------------------------------


def test_keys_list_shows_keys_without_secrets(cli):
    """`keys list` and `keys list --json` describe every key but never show a secret."""
    admin = cli.admin()
    s1, s2 = new_secret(), new_secret()
    admin.put_key("free", "k1", s1, account="acct-a", models=("m/a", "m/b"))
    admin.put_key("paid", "k2", s2, daily_limit=1000)

    text = ok(cli("keys", "list"))
    rows = [line.split("\t") for line in text.splitlines()]
    assert rows == [
        ["free/k1", "account=acct-a", "enabled", "v1", "vault:v1"],
        ["paid/k2", "account=key:paid/k2", "enabled", "v1", "vault:v1"],
    ]
    raw = ok(cli("keys", "list", "--json"))
    listed = {f"{r['pool']}/{r['name']}": r for r in json.loads(raw)}
    assert set(listed) == {"free/k1", "paid/k2"}
    assert listed["free/k1"]["account"] == "acct-a"
    assert listed["free/k1"]["models"] == ["m/a", "m/b"]
    assert listed["paid/k2"]["daily_limit"] == 1000
    assert all(r["enabled"] is True and r["version"] == 1 for r in listed.values())
    assert not any("secret" in field or field == "ciphertext" for r in listed.values()
                   for field in r)
    for out in (text, raw):
        assert s1 not in out and s2 not in out

    only_paid = ok(cli("keys", "list", "--pool", "paid"))
    assert only_paid.splitlines()[0].startswith("paid/k2\t") and len(only_paid.splitlines()) == 1
    # The KEYBROKER_VAULT_* variables work in place of VAULT_ADDR / VAULT_TOKEN.
    alt = cli("keys", "list", drop=("VAULT_ADDR", "VAULT_TOKEN"),
              env={"KEYBROKER_VAULT_ADDR": cli.settings.addr,
                   "KEYBROKER_VAULT_TOKEN": cli.settings.token})
    assert ok(alt) == text


async def test_keys_disable_enable_and_rm_change_vault(cli):
    """`keys disable`, `enable` and `rm` change the key in Vault as the broker will read it."""
    admin = cli.admin()
    secret = new_secret()
    admin.put_key("free", "k1", secret)
    admin.put_key("free", "k2", new_secret())

    def enabled() -> dict[str, bool]:
        return {f"{r['pool']}/{r['name']}": r["enabled"]
                for r in json.loads(ok(cli("keys", "list", "--json")))}

    assert ok(cli("keys", "disable", "free/k1")).strip() == "disabled free/k1"
    assert enabled() == {"free/k1": False, "free/k2": True}
    loaded = {k.key_id: k for k in await VaultKeySource(VaultSession(cli.settings)).load()}
    assert not loaded["free/k1"].enabled and loaded["free/k1"].secret.reveal() == secret
    assert "\tdisabled\t" in ok(cli("keys", "list", "--pool", "free")).splitlines()[0]

    assert ok(cli("keys", "enable", "free/k1")).strip() == "enabled free/k1"
    assert enabled() == {"free/k1": True, "free/k2": True}

    assert ok(cli("keys", "rm", "free/k1")).strip() == "removed free/k1"
    assert enabled() == {"free/k2": True}
    with pytest.raises(hvac.exceptions.InvalidPath):  # every version is gone, not soft-deleted
        cli.root().secrets.kv.v2.read_secret_metadata(
            path=f"{cli.settings.key_prefix}/free/k1", mount_point=cli.settings.kv_mount)


def test_keys_commands_on_a_missing_key_fail_clearly(cli):
    """disable/enable/rm of an unknown key or a malformed id exit non-zero with a clear message."""
    cli.admin().put_key("free", "k1", new_secret())
    for command in ("disable", "enable", "rm"):
        refused(cli("keys", command, "free/nope"), "free/nope: not found")
        refused(cli("keys", command, "nopool"), "expected POOL/NAME")
    assert [r.enabled for r in cli.admin().list_keys()] == [True]


def test_cli_reports_an_unreachable_or_unauthenticated_vault_clearly(cli):
    """Without a reachable Vault or without a token the CLI exits non-zero with a short message."""
    dead = f"http://127.0.0.1:{free_port()}"
    refused(cli("keys", "list", env={"VAULT_ADDR": dead}), f"Error: vault unreachable at {dead}")
    refused(cli("keys", "list", drop=("VAULT_TOKEN",)), "no Vault token configured")


# -- vault rewrap ----------------------------------------------------------------------------


async def test_vault_rewrap_moves_keys_to_the_latest_transit_version(cli):
    """After a Transit key rotation `vault rewrap` re-encrypts every key; secrets are unchanged."""
    own = cli.with_transit_key(f"kb-{uuid.uuid4().hex[:8]}")
    ok(own("vault", "bootstrap"))
    expect = {}
    for pool, name in (("free", "k1"), ("paid", "k2")):
        expect[f"{pool}/{name}"] = new_secret()
        ok(own("keys", "put", "--pool", pool, "--name", name,
               stdin=expect[f"{pool}/{name}"] + "\n"))
    own.root().secrets.transit.rotate_key(name=own.settings.transit_key,
                                          mount_point=own.settings.transit_mount)

    assert ok(own("vault", "rewrap")).strip() == "rewrapped 2 key(s)"
    rows = ok(own("keys", "list")).splitlines()
    assert [row.split("\t")[-1] for row in rows] == ["vault:v2", "vault:v2"]
    assert await own.stored() == expect


def test_vault_rewrap_leaves_current_keys_alone(cli):
    """`vault rewrap` with every key already on the latest Transit version rewrites nothing."""
    own = cli.with_transit_key(f"kb-{uuid.uuid4().hex[:8]}")
    ok(own("vault", "bootstrap"))
    ok(own("keys", "put", "--pool", "free", "--name", "k1", stdin=new_secret() + "\n"))
    assert ok(own("vault", "rewrap")).strip() == "rewrapped 0 key(s)"
    assert [r.version for r in own.admin().list_keys()] == [1]


# -- token new -------------------------------------------------------------------------------


def test_token_new_prints_a_token_and_its_sha256(cli):
    """`token new` prints a fresh bearer token and the sha256 a policy file needs to accept it."""
    def parse(out: str) -> dict[str, Any]:
        fields = dict(line.split(":", 1) for line in out.splitlines())
        return {k.strip(): v.strip() for k, v in fields.items()}

    first, second = parse(ok(cli("token", "new"))), parse(ok(cli("token", "new")))
    assert set(first) == {"token", "token_sha256"}
    assert first["token"] != second["token"]
    for t in (first, second):
        assert hashlib.sha256(t["token"].encode()).hexdigest() == t["token_sha256"]
        assert parse_bearer(f"Bearer {t['token']}") == t["token"]
    policy = Policy.from_mapping({
        "roles": {"r": {"rpcs": ["LeaseKey"], "pools": ["free"]}},
        "principals": [{"name": "svc", "token_sha256": first["token_sha256"], "roles": ["r"]}]})
    assert policy.by_token(first["token"]).name == "svc"


def test_every_command_maps_broker_errors_in_one_place(tmp_path):
    """Any command's BrokerError, wherever it is raised, ends as its message on stderr and exit
    code 1, with no traceback (the mapping lives in the command group, not in each command)."""
    from click.testing import CliRunner

    from broker.cli import main

    dead = {"KEYBROKER_VAULT_ADDR": f"http://127.0.0.1:{free_port()}",
            "KEYBROKER_VAULT_TOKEN": "t", "KEYBROKER_VAULT_TIMEOUT": "0.5"}
    commands = [["keys", "list"], ["keys", "rm", "free/k1"], ["vault", "rewrap"],
                ["vault", "bootstrap"]]
    for argv in commands:
        result = CliRunner().invoke(main, argv, env=dead)
        assert result.exit_code == 1, (argv, result.output)
        assert result.output.startswith("Error: vault") and "Traceback" not in result.output
        assert dead["KEYBROKER_VAULT_ADDR"] in result.output
        assert "ConnectionError" in result.output, result.output


HEAVY = ["grpc", "opentelemetry", "hvac", "prometheus_client", "redis", "httpx"]


# Every command but --help configures structlog, which brings rich (its console renderer).
@pytest.mark.parametrize(("argv", "heavy"), [(["--help"], [*HEAVY, "rich", "structlog"]),
                                             (["token", "new"], HEAVY)])
def test_light_commands_import_no_heavy_library(argv, heavy):
    """`keybroker --help` and `keybroker token new` load neither gRPC, OpenTelemetry, hvac,
    prometheus_client, redis nor httpx (and --help not even structlog and rich)."""
    code = ("import sys\nfrom broker.cli import main\n"
            f"try:\n    main({argv!r}, prog_name='keybroker')\n"
            "except SystemExit as exc:\n    assert not exc.code\n"
            f"print([m for m in {heavy!r} if m in sys.modules], file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stderr.strip().splitlines()[-1] == "[]"
    assert "Usage: keybroker" in done.stdout or "token_sha256" in done.stdout


# -- keys import -------------------------------------------------------------------------------


def test_keys_import_puts_toml_json_and_csv_rows_with_secrets_from_env_and_stdin(cli, tmp_path):
    """`keys import` stores every row of a TOML, JSON or CSV file, secrets from secret_env
    variables or 'POOL/NAME SECRET' stdin lines, with the row's account, limits and models."""
    s1, s2, s3, s4 = (new_secret() for _ in range(4))
    toml_file = tmp_path / "keys.toml"
    toml_file.write_text('[[keys]]\npool = "free"\nname = "t1"\naccount = "acct-a"\n'
                         'daily_limit = 40\nminute_limit = 5\nsecret_env = "S1"\n'
                         f'base_url = "{LOOPBACK_TEST_URL}"\n'
                         '[[keys]]\npool = "free"\nname = "t2"\nmodels = ["m/a", "m/b"]\n')
    json_file = tmp_path / "keys.json"
    json_file.write_text(json.dumps([{"pool": "paid", "name": "j1", "secret_env": "S3",
                                      "enabled": False}]))
    csv_file = tmp_path / "keys.csv"
    csv_file.write_text("pool,name,account,models,daily_limit,secret_env\n"
                        "free,c1,acct-c,m/a;m/b,7,S4\n")
    out = ok(cli("keys", "import", str(toml_file), "--secrets-stdin", stdin=f"free/t2 {s2}\n",
                 env={"S1": s1}))
    assert out.splitlines()[-1] == "imported 2 key(s)"
    ok(cli("keys", "import", str(json_file), env={"S3": s3}))
    ok(cli("keys", "import", str(csv_file), env={"S4": s4}))
    records = {f"{r.pool}/{r.name}": r for r in cli.admin().list_keys()}
    assert (records["free/t1"].account, records["free/t1"].daily_limit,
            records["free/t1"].minute_limit) == ("acct-a", 40, 5)
    assert records["free/t1"].base_url == LOOPBACK_TEST_URL
    assert records["free/t2"].models == ("m/a", "m/b")
    assert records["paid/j1"].enabled is False
    assert (records["free/c1"].account, records["free/c1"].daily_limit) == ("acct-c", 7)
    assert records["free/c1"].models == ("m/a", "m/b")
    stored = asyncio.run(cli.stored())
    assert {k: stored[k] for k in ("free/t1", "free/t2", "paid/j1", "free/c1")} == {
        "free/t1": s1, "free/t2": s2, "paid/j1": s3, "free/c1": s4}


@pytest.mark.parametrize(("content", "message"), [
    ('[[keys]]\npool = "free"\nname = "x1"\nsecret = "sk-or-v1-in-the-file"\n',
     "secrets never go in the file"),
    ('[[keys]]\npool = "free"\nname = "x1"\nsecret_env = "UNSET_VAR"\n',
     "no secret for 1 key(s): $UNSET_VAR"),
    ('[[keys]]\npool = "free"\n', "pool and name are required"),
    ('[[keys]]\npool = "free"\nname = "x1"\ndaily_limit = "lots"\n', "daily_limit must be a whole number"),
    ('[[keys]]\npool = "free"\nname = "bad name!"\nsecret_env = "S"\n', "key 1: "),
    ('[[keys]]\npool = "free"\nname = "x1"\nsecret_env = "S"\n[[keys]]\npool = "free"\n'
     'name = "x2"\nsecret_env = "UNSET_VAR"\n', "nothing was written"),
    ("[[keys]\n", "not valid TOML"),
])
def test_keys_import_refuses_a_bad_file_in_one_line_and_writes_nothing(cli, tmp_path, content,
                                                                       message):
    """A bad key file or a missing secret: exit 2, one line naming the file and field, no key
    written, and no secret echoed."""
    path = tmp_path / "keys.toml"
    path.write_text(content)
    result = cli("keys", "import", str(path), env={"S": new_secret()})
    refused(result, message)
    assert result.returncode == 2
    assert "sk-or-v1-in-the-file" not in result.stderr
    assert cli.admin().list_keys() == []


# -- key lifecycle ---------------------------------------------------------------------------


def test_management_key_is_stored_from_an_env_var_and_never_printed(cli):
    """`keys management-key --secret-env VAR` stores the account's management key in Vault on
    its own path (not a leasable key) and prints only which account it stored."""
    secret = new_secret()
    result = cli("keys", "management-key", "--account", "acct-a", "--secret-env", "KB_MGMT",
                 env={"KB_MGMT": secret})
    assert ok(result).strip() == "stored the management key of account acct-a"
    assert secret not in result.stdout + result.stderr
    assert cli.admin().management_key("acct-a").reveal() == secret
    assert cli.admin().list_keys() == []


def test_lifecycle_commands_refuse_bad_arguments_in_one_line(cli):
    """rotate/revoke without POOL/NAME, provision with a bad --expires or count, and no token
    are one line and a usage exit code, never a traceback."""
    refused(cli("keys", "rotate", "no-slash"), "expected POOL/NAME")
    refused(cli("keys", "revoke", "no-slash"), "expected POOL/NAME")
    refused(cli("keys", "provision", "--account", "a", "--pool", "p", "--expires", "soon"),
            "--expires")
    refused(cli("keys", "provision", "--account", "a", "--pool", "p", "--count", "0"),
            "--count")
    refused(cli("keys", "rotate", "free/k1"), "KEYBROKER_TOKEN")
    assert cli("keys", "rotate", "free/k1").returncode == 2
