"""Properties the adversarial review found sound, pinned so they stay so (the "Keep" list of
docs/security.md)."""

from __future__ import annotations

from pathlib import Path

import yaml

from broker.config import Settings, VaultSettings
from broker.metrics import Metrics
from broker.vault import VaultSession

ROOT = Path(__file__).resolve().parent.parent


def test_vault_tls_verification_is_on_by_default():
    """Without a setting the Vault client verifies the server's TLS certificate."""
    assert VaultSettings().verify == "true"
    session = VaultSession(VaultSettings(addr="https://vault.example:8200"))
    assert session._client.session.verify is True


def test_metrics_are_off_by_default_and_on_loopback_without_a_host():
    """No /metrics endpoint unless configured, and ":port" binds 127.0.0.1 only."""
    assert Settings().metrics_listen == ""
    metrics = Metrics()
    try:
        metrics.serve(":0")
        assert metrics._server.server_address[0] == "127.0.0.1"
    finally:
        metrics.close()


def test_the_pod_is_non_root_read_only_and_capability_less():
    """The Kubernetes deployment runs as a non-root user, with a read-only root filesystem,
    no privilege escalation and every capability dropped."""
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text()))
    (deployment,) = [d for d in docs if d and d.get("kind") == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for container in pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
