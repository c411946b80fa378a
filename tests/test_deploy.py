"""deploy/ and the configuration reference, checked as far as a machine without Docker allows."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import inspect
import json
import os
import re
import stat
import sys
import tomllib
from pathlib import Path
from typing import Any

import grpc
import hvac
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from keybroker_client import AsyncKeyBrokerClient

from broker import config as config_module
from broker.config import OpenRouterSettings, Settings, VaultAuth, VaultSettings, load_settings
from broker.runtime import Broker
from broker.testing import BaoDevServer
from broker.vault import VaultAdmin, broker_policy_hcl, operator_policy_hcl

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KEYBROKER_CLI = Path(sys.executable).parent / "keybroker"
BOOTSTRAP_DIR = "/var/lib/keybroker/bootstrap"  # the shared volume in docker-compose.yml

# Settings the manifests use ahead of broker/config.py: the Redis store is being
# built (issue 4). Each entry is accepted only while the reference lacks it; once
# config.py has the setting (or the choice), it is checked like any other.
AHEAD_OF_CONFIG: dict[str, str | None] = {
    "KEYBROKER_STORE_BACKEND": "redis",  # value not yet a StoreBackend choice
    "KEYBROKER_STORE_REDIS_URL": None,  # variable not yet a setting
}


def _load_configref() -> Any:
    spec = importlib.util.spec_from_file_location("configref", ROOT / "tools" / "configref.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["configref"] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


configref = _load_configref()


@pytest.fixture(scope="module")
def reference() -> Any:
    return configref.build_reference()


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s(kind: str, name: str = "keybroker") -> dict[str, Any]:
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in _yaml_docs(path):
            if doc.get("kind") == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _container() -> dict[str, Any]:
    (container,) = _k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, as docker reads them."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", "")
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _healthcheck_command() -> list[str]:
    (args,) = [rest for word, rest in _dockerfile_instructions() if word == "HEALTHCHECK"]
    return json.loads(args[args.index("CMD") + len("CMD"):])


def _image_scripts() -> dict[str, Path]:
    """Scripts the Dockerfile copies to /usr/local/bin: command name -> file in deploy/."""
    out = {}
    for word, rest in _dockerfile_instructions():
        if word == "COPY" and rest.split()[-1].startswith("/usr/local/bin/"):
            source, target = rest.split()[-2:]
            out[target.rpartition("/")[2]] = ROOT / source
    return out


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _broker_port() -> int:
    return int(Settings().listen.rpartition(":")[2])


def _check_known(reference: Any, name: str, value: str | None) -> bool:
    """True when the reference documents `name` (and `value` is a valid choice);
    False when it is an accepted AHEAD_OF_CONFIG entry; fails otherwise."""
    settings = reference.env_vars()
    if name in settings:
        choices = settings[name].choices
        if not choices or value is None or value.lower() in choices:
            return True
    if name in AHEAD_OF_CONFIG and AHEAD_OF_CONFIG[name] in (None, value):
        return False
    raise AssertionError(f"{name}={value!r} is used in deploy/ but is no setting of broker/config.py "
                         "(docs/configuration.md)")


def test_configuration_reference_is_current():
    """docs/configuration.md is exactly what tools/configref.py renders from broker/config.py now."""
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == configref.render(), "docs/configuration.md is stale: run `make docs`"


_EXAMPLES = {"KEYBROKER_WORKERS": "3"}
"""Values for string settings that take a format (not any text)."""


def test_reference_covers_every_setting_with_a_working_variable(reference):
    """Every settings field is in the reference, and each documented variable really sets its field."""
    sections = {sec.title: sec for sec in reference.sections}
    for title, cls in [("top level", Settings), *config_module._SECTIONS.items()]:
        scalar = [f.name for f in dataclasses.fields(cls)
                  if f.name not in ("pools", "accounts", *config_module._SECTIONS)]
        assert [s.name for s in sections[title].settings] == scalar, title
    assert [s.name for s in sections["pools.<name>"].settings] == [
        f.name for f in dataclasses.fields(config_module.PoolSettings)]
    assert [s.name for s in sections["accounts.<name>"].settings] == [
        f.name for f in dataclasses.fields(config_module.AccountSettings)]
    # Every documented variable at once, each with a value other than its default (all
    # at once so settings that go together, like tls cert_file and key_file, validate).
    default = Settings()
    env, expected = {}, {}
    for var, setting in reference.env_vars().items():
        section = var.removeprefix("KEYBROKER_").lower().partition("_")[0]
        owner = section if section in config_module._SECTIONS else ""
        current = getattr(getattr(default, owner) if owner else default, setting.name)
        if var in _EXAMPLES:  # a string with a format of its own
            value: Any = _EXAMPLES[var]
        elif setting.choices:
            value = next((c for c in setting.choices if c != current), setting.choices[0])
        elif current is None:  # an optional switch (reflection): unset means "decide for me"
            value = True
        elif isinstance(current, tuple):  # a list of provider base URLs
            value = ("https://provider.example/api/v1", "https://other.example/v1")
        elif isinstance(current, bool):
            value = not current
        elif isinstance(current, int):
            value = current + 1
        elif isinstance(current, float):
            value = current / 2 if current > 0 else 0.5
        else:
            value = f"value-of-{var.lower()}"
        env[var] = (str(value).lower() if isinstance(value, bool) else
                    ",".join(value) if isinstance(value, tuple) else str(value))
        expected[(owner, setting.name)] = value
    loaded = load_settings(None, env)
    for (owner, name), value in expected.items():
        got = getattr(getattr(loaded, owner) if owner else loaded, name)
        assert got == value, f"{owner}.{name}: expected {value!r} from its variable, got {got!r}"


def test_every_keybroker_variable_in_deploy_is_in_the_reference(reference):
    """Each KEYBROKER_* name in deploy/ or docs/deployment.md is a documented setting or CLI variable."""
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [ROOT / "docs" / "deployment.md"]
    used = {name for p in files for name in re.findall(r"\bKEYBROKER_[A-Z0-9_]*[A-Z0-9]\b", p.read_text())}
    assert {"KEYBROKER_VAULT_AUTH", "KEYBROKER_VAULT_ROLE_ID", "KEYBROKER_VAULT_SECRET_ID_FILE",
            "KEYBROKER_STORE_BACKEND", "KEYBROKER_STORE_REDIS_URL"} <= used
    documented = reference.all_env_names()
    for name in sorted(used - documented):
        _check_known(reference, name, None)


def test_manifest_and_compose_settings_load(reference, tmp_path):
    """The Deployment's and the compose broker's variables (with the ConfigMap's file) pass load_settings."""
    container = _container()
    configmap = _k8s("ConfigMap", "keybroker-config")
    config_file = tmp_path / "keybroker.toml"
    config_file.write_text(configmap["data"]["keybroker.toml"])
    k8s_env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert k8s_env.pop("KEYBROKER_CONFIG") == mount["mountPath"]
    compose_env = dict(_compose()["services"]["broker"]["environment"])
    for env in (k8s_env, compose_env):
        loadable = {}
        for name, value in env.items():
            if not name.startswith("KEYBROKER_") or not _check_known(reference, name, value):
                continue
            if value is None:  # from a Secret: any well-formed value
                value = "redis://redis.invalid:6379/0" if name.endswith("_URL") else "from-a-secret"
            loadable[name] = value
        if env is compose_env:  # read from the shared volume at start (see its command)
            loadable["KEYBROKER_VAULT_ROLE_ID"] = "from-the-bootstrap-volume"
        settings = load_settings(config_file if env is k8s_env else None, loadable)
        assert settings.vault.auth is VaultAuth.APPROLE
        assert settings.listen == f"0.0.0.0:{_broker_port()}"
        assert settings.policy_file


def test_yaml_files_parse_and_compose_has_the_stack():
    """Every YAML file in deploy/ parses; compose runs broker, OpenBao, Redis (AOF), Jaeger, Prometheus."""
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        docs = _yaml_docs(path)
        assert docs, path
        if path.parent.name == "k8s" and path.name != "kustomization.yaml":
            for doc in docs:
                assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (DEPLOY / "k8s" / resource).is_file(), resource
    services = _compose()["services"]
    assert set(services) == {"certs", "vault", "bootstrap", "redis", "broker", "jaeger",
                             "prometheus", "emulator", "grafana"}
    redis = services["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert redis[redis.index("--appendfsync") + 1] == "always"
    jaeger_ports = {p.rpartition(":")[2] for p in services["jaeger"]["ports"]}
    assert {"4317", "16686"} <= jaeger_ports
    assert services["broker"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    volume = services["prometheus"]["volumes"][0]
    source = DEPLOY / volume.split(":")[0]
    assert yaml.safe_load(source.read_text())["scrape_configs"], "prometheus.yml scrapes nothing"
    assert services["broker"]["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"


def test_manifests_use_the_broker_port_image_and_shutdown():
    """Port, image tag, replicas, disruption budget and drain timing agree with the broker."""
    port, image = _broker_port(), f"keybroker:{_project_version()}"
    container = _container()
    deployment = _k8s("Deployment")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["replicas"] == 3
    assert container["image"] == image
    assert container["ports"][0] == {"name": "grpc", "containerPort": port, "protocol": "TCP"}
    env = {e["name"]: e for e in container["env"]}
    assert env["KEYBROKER_LISTEN"]["value"] == f"0.0.0.0:{port}"
    assert env["KEYBROKER_STORE_BACKEND"]["value"] == "redis"
    assert env["KEYBROKER_VAULT_ROLE_ID"]["valueFrom"]["secretKeyRef"]["name"] == "keybroker-approle"
    secret_file = Path(env["KEYBROKER_VAULT_SECRET_ID_FILE"]["value"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(secret_file.parent))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "keybroker-approle"
    assert [i["path"] for i in volume["secret"]["items"]] == [secret_file.name]
    scripts = _image_scripts()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"][0] in scripts, probe
    metrics_port = int(env["KEYBROKER_METRICS_LISTEN"]["value"].rpartition(":")[2])
    assert {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"} in container["ports"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # Drain: preStop, then SIGTERM -> NOT_SERVING and Broker.stop's grace, inside the pod's grace.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    drain = inspect.signature(Broker.stop).parameters["grace"].default
    assert pre_stop[0] == "sleep"
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain
    for service in ("keybroker", "keybroker-headless"):
        (svc_port,) = _k8s("Service", service)["spec"]["ports"]
        assert svc_port["port"] == port and svc_port["targetPort"] == "grpc"
        assert _k8s("Service", service)["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    pdb = _k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert 0 < pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert kustomization["images"] == [{"name": "keybroker", "newTag": _project_version()}]

    compose = _compose()["services"]
    for name in ("broker", "bootstrap"):
        assert compose[name]["image"] == image
        assert compose[name]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert compose["broker"]["ports"] == [f"127.0.0.1:{port}:{port}"]
    metrics = compose["broker"]["environment"]["KEYBROKER_METRICS_LISTEN"].rpartition(":")[2]
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    assert f"broker:{metrics}" in next(s for s in scrape if s["job_name"] == "keybroker"
                                       )["static_configs"][0]["targets"]

    instructions = _dockerfile_instructions()
    args = dict(rest.partition("=")[::2] for word, rest in instructions if word == "ARG")
    froms = [args.get(rest.split()[0].strip("${}"), rest) for word, rest in instructions
             if word == "FROM"]
    assert all(f.startswith("python:3.11-slim") for f in froms)
    assert ("EXPOSE", str(port)) in instructions
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    env_line = next(rest for word, rest in instructions if word == "ENV" and "KEYBROKER_LISTEN" in rest)
    assert f"KEYBROKER_LISTEN=0.0.0.0:{port}" in env_line.split()


async def _run(*cmd: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run a command without blocking the event loop (a broker may be serving on it)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_probes_and_healthcheck_ask_services_the_broker_serves(start_broker, put_keys,
                                                                     vault_settings):
    """The probes' health services are SERVING on a real broker, and the Dockerfile HEALTHCHECK
    passes against it and fails against one whose keys never load."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    container = _container()
    services = {container[p]["exec"]["command"][1]
                for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert "keybroker.v1.KeyBroker" in services
    async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in services:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as info:  # the check is not vacuous
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert info.value.code() is grpc.StatusCode.NOT_FOUND

    (command,) = _healthcheck_command()
    script = str(_image_scripts()[command])
    env = {**os.environ, "KEYBROKER_LISTEN": f"127.0.0.1:{broker.port}"}
    rc, out = await _run(sys.executable, script, env=env)
    assert rc == 0, out
    stuck = await start_broker(wait_ready=False, vault=dataclasses.replace(
        vault_settings, token="not-a-valid-token"))
    rc, out = await _run(sys.executable, script,
                         env={**os.environ, "KEYBROKER_LISTEN": f"127.0.0.1:{stuck.port}"})
    assert rc == 1, out


def test_vault_policy_files_equal_what_bootstrap_applies():
    """deploy/vault/*.hcl are exactly broker_policy_hcl/operator_policy_hcl with default settings."""
    vault = VaultSettings()
    hint = ("regenerate: python -c 'from broker.vault import *; from broker.config import VaultSettings; "
            "print(broker_policy_hcl(VaultSettings()), end=\"\")' > deploy/vault/keybroker-broker.hcl")
    assert (DEPLOY / "vault" / "keybroker-broker.hcl").read_text() == broker_policy_hcl(vault), hint
    assert (DEPLOY / "vault" / "keybroker-operator.hcl").read_text() == operator_policy_hcl(vault), hint


async def test_bootstrap_script_configures_vault_and_writes_approle_credentials(bao, tmp_path):
    """deploy/bootstrap.sh applies the HCL policies and the AppRole, and its credentials log in."""
    env = {**os.environ, "VAULT_ADDR": bao.addr, "VAULT_TOKEN": bao.root_token,
           "KEYBROKER": str(KEYBROKER_CLI)}
    for name in list(env):
        if name.startswith("KEYBROKER_"):
            del env[name]
    creds = tmp_path / "creds"
    for _ in range(2):  # idempotent: a second run succeeds and issues a fresh secret_id
        rc, out = await _run("sh", str(DEPLOY / "bootstrap.sh"), str(creds), env=env)
        assert rc == 0, out
    assert sorted(p.name for p in creds.iterdir()) == ["role_id", "secret_id"]
    for p in creds.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    root = hvac.Client(url=bao.addr, token=bao.root_token)
    for name in (VaultAdmin.BROKER_POLICY, VaultAdmin.OPERATOR_POLICY):
        applied = root.sys.read_policy(name=name)["data"]["rules"]
        assert applied == (DEPLOY / "vault" / f"{name}.hcl").read_text(), name
    login = hvac.Client(url=bao.addr).auth.approle.login(
        role_id=(creds / "role_id").read_text(), secret_id=(creds / "secret_id").read_text())
    assert VaultAdmin.BROKER_POLICY in login["auth"]["token_policies"]
    rc, out = await _run("sh", str(DEPLOY / "bootstrap.sh"), env={**env, "VAULT_TOKEN": ""})
    assert rc == 2 and "VAULT_TOKEN" in out


async def test_compose_bootstrap_gives_a_broker_that_serves_demo_keys(tmp_path, start_broker):
    """The compose bootstrap step, run against a fresh OpenBao, yields AppRole credentials, a policy
    and demo keys with which a real broker grants leases to the demo caller."""
    script = _compose()["services"]["bootstrap"]["command"][0]
    shared = tmp_path / "shared"
    script = script.replace("$$", "$").replace(BOOTSTRAP_DIR, str(shared))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "keybroker-bootstrap").symlink_to(DEPLOY / "bootstrap.sh")
    (bin_dir / "keybroker").symlink_to(KEYBROKER_CLI)
    with BaoDevServer() as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
        env.update(VAULT_ADDR=server.addr, VAULT_TOKEN=server.root_token,
                   PATH=f"{bin_dir}:{env.get('PATH', '')}")
        outputs = []
        for _ in range(2):  # `docker compose up` runs it again on every start
            rc, out = await _run("/bin/sh", "-ec", script, env=env)
            assert rc == 0, out
            outputs.append(out)
        tokens = dict(re.findall(r"^demo (caller|admin) token[^:]*: (\S+)$", outputs[0], re.M))
        assert set(tokens) == {"caller", "admin"}
        assert tokens["caller"] in outputs[1], "the second run keeps the first run's tokens"

        vault = VaultSettings(addr=server.addr, auth=VaultAuth.APPROLE,
                              role_id=(shared / "role_id").read_text(),
                              secret_id_file=str(shared / "secret_id"), reload_interval=3600.0)
        env = _compose()["services"]["broker"]["environment"]  # the broker allows what compose does
        openrouter = OpenRouterSettings(
            allowed_base_urls=(env["KEYBROKER_OPENROUTER_ALLOWED_BASE_URLS"],),
            allow_http_hosts=(env["KEYBROKER_OPENROUTER_ALLOW_HTTP_HOSTS"],))
        broker = await start_broker(vault=vault, policy_file=str(shared / "policy.toml"),
                                    openrouter=openrouter)
        async with AsyncKeyBrokerClient(f"127.0.0.1:{broker.port}", token=tokens["caller"]) as caller, \
                AsyncKeyBrokerClient(f"127.0.0.1:{broker.port}", token=tokens["admin"]) as admin:
            lease = await caller.lease_key("free")
            assert lease.api_key.startswith("sk-or-v1-demo-")
            assert lease.base_url == "http://emulator:8080/api/v1"
            await caller.complete(lease.lease_id, used=False)
            keys = await admin.list_keys("free")
            assert [k.key_id for k in keys] == ["free/demo-1", "free/demo-2", "free/demo-3"]


def _emulator_port() -> str:
    command = _compose()["services"]["emulator"]["command"]
    return command[command.index("--port") + 1]


async def test_compose_emulator_serves_the_demo_keys_bootstrap_wrote(tmp_path):
    """The compose emulator's command, given the accounts file the bootstrap step wrote, answers a
    chat completion with a demo key's secret; its port is the one the keys' base_url names and
    the one its healthcheck asks."""
    from broker.testing.emulator import Emulator, load_accounts

    services = _compose()["services"]
    emulator = services["emulator"]
    port = _emulator_port()
    command = emulator["command"]
    assert command[:1] == ["emulate-openrouter"] and command[command.index("--host") + 1] == "0.0.0.0"
    accounts_arg = command[command.index("--accounts") + 1]
    assert accounts_arg.startswith(BOOTSTRAP_DIR + "/")
    assert f"{BOOTSTRAP_DIR}:ro" in " ".join(emulator["volumes"])
    assert emulator["build"]["args"]["EXTRAS"] == "testing"
    assert f"127.0.0.1:{port}" in " ".join(emulator["healthcheck"]["test"])
    assert services["broker"]["depends_on"]["emulator"]["condition"] == "service_healthy"
    assert services["emulator"]["depends_on"]["bootstrap"]["condition"] == \
        "service_completed_successfully"
    script = services["bootstrap"]["command"][0]
    assert f"--base-url http://emulator:{port}/api/v1" in script
    # Run the bootstrap script's key step for real and load what it wrote.
    shared = tmp_path / "shared"
    shared.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "keybroker-bootstrap").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "keybroker-bootstrap").chmod(0o755)
    fake_cli = bin_dir / "keybroker"
    fake_cli.write_text("#!/bin/sh\n"  # `token new` answers; everything else succeeds silently
                        "[ \"$1 $2\" = \"token new\" ] && printf 'token: t\\ntoken_sha256: h\\n'\n"
                        "exit 0\n")
    fake_cli.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    rc, out = await _run("/bin/sh", "-ec", script.replace("$$", "$").replace(BOOTSTRAP_DIR, str(shared)),
                         env=env)
    assert rc == 0, out
    specs = load_accounts(shared / Path(accounts_arg).name)
    assert sorted(a.name for a, _ in specs) == ["acct-1", "acct-2", "acct-3"]
    (account, [(name, secret)]) = specs[0]
    assert name == "demo-1" and secret.startswith("sk-or-v1-demo-")
    async with Emulator([account]) as emu:
        emu.add_key(account.name, secret, name=name)
        import httpx

        async with httpx.AsyncClient() as http:
            reply = await http.post(f"{emu.base_url}/chat/completions",
                                    headers={"Authorization": f"Bearer {secret}"},
                                    json={"model": "meta-llama/llama-3.3-70b-instruct:free",
                                          "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200, reply.text


def test_compose_grafana_is_provisioned_with_prometheus_and_the_dashboard():
    """Grafana starts with the Prometheus datasource (the compose service and port) as default
    and a file provider whose folder holds the keybroker dashboard."""
    services = _compose()["services"]
    grafana = services["grafana"]
    mounts = {v.split(":")[1]: DEPLOY / v.split(":")[0] for v in grafana["volumes"]}
    for host in mounts.values():
        assert host.exists(), host
    datasources = next(h for c, h in mounts.items() if c.endswith("provisioning/datasources"))
    (source,) = [d for f in sorted(datasources.glob("*.y*ml"))
                 for d in yaml.safe_load(f.read_text())["datasources"]]
    prometheus_port = services["prometheus"]["ports"][0].rpartition(":")[2]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    providers_dir = next(h for c, h in mounts.items() if c.endswith("provisioning/dashboards"))
    (provider,) = [p for f in sorted(providers_dir.glob("*.y*ml"))
                   for p in yaml.safe_load(f.read_text())["providers"]]
    folder = provider["options"]["path"]
    dashboards = [h for c, h in mounts.items() if c.startswith(folder)]
    assert dashboards and all(json.loads(h.read_text())["uid"] == "keybroker" for h in dashboards)
    assert "prometheus" in grafana["depends_on"]
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]


def _merge_by(base: list[dict[str, Any]], patch: list[dict[str, Any]], key: str
              ) -> list[dict[str, Any]]:
    """A strategic-merge patch of a list of objects keyed by ``key`` (with $patch: delete)."""
    out = {item[key]: item for item in base}
    for item in patch:
        if item.get("$patch") == "delete":
            assert item[key] in out, f"the patch deletes {item[key]!r}, which the base lacks"
            del out[item[key]]
        else:
            out[item[key]] = {**out.get(item[key], {}), **item}
    return list(out.values())


def test_vault_kubernetes_auth_overlay_logs_in_with_a_projected_token(reference, tmp_path):
    """deploy/k8s/vault-kubernetes-auth swaps the AppRole variables and volume for kubernetes auth
    with a projected service-account token, and the result passes the broker's settings loader."""
    overlay = DEPLOY / "k8s" / "vault-kubernetes-auth"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (overlay / resource).exists(), resource
    (patch_ref,) = kustomization["patches"]
    patch = yaml.safe_load((overlay / patch_ref["path"]).read_text())["spec"]["template"]["spec"]
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    (patched,) = patch["containers"]
    env = _merge_by(_container()["env"], patched["env"], "name")
    mounts = _merge_by(_container()["volumeMounts"], patched["volumeMounts"], "mountPath")
    volumes = _merge_by(pod["volumes"], patch["volumes"], "name")
    (account,) = _yaml_docs(overlay / "serviceaccount.yaml")
    assert patch["serviceAccountName"] == account["metadata"]["name"]
    values = {e["name"]: e.get("value") for e in env}
    assert not {"KEYBROKER_VAULT_ROLE_ID", "KEYBROKER_VAULT_SECRET_ID_FILE"} & set(values)
    assert "approle" not in {v["name"] for v in volumes}
    jwt_dir = str(Path(values["KEYBROKER_VAULT_JWT_FILE"]).parent)
    mount = next(m for m in mounts if m["mountPath"] == jwt_dir)
    volume = next(v for v in volumes if v["name"] == mount["name"])
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"]["path"] == Path(values["KEYBROKER_VAULT_JWT_FILE"]).name
    config_file = tmp_path / "keybroker.toml"
    config_file.write_text(_k8s("ConfigMap", "keybroker-config")["data"]["keybroker.toml"])
    loadable = {k: v if v is not None else "redis://redis.invalid:6379/0"
                for k, v in values.items() if k.startswith("KEYBROKER_") and k != "KEYBROKER_CONFIG"
                and _check_known(reference, k, v)}
    settings = load_settings(config_file, loadable)
    assert settings.vault.auth is VaultAuth.KUBERNETES and settings.vault.role == "keybroker"
    assert settings.tls.cert_file and settings.vault.verify.endswith("ca.crt")
