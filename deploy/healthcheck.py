#!/usr/bin/env python
"""grpc.health.v1 Check against the broker in this container: exit 0 when SERVING, else 1.

Usage: keybroker-healthcheck [SERVICE]   (default keybroker.v1.KeyBroker; "" = the whole server)

It reads the broker's own settings (KEYBROKER_CONFIG and KEYBROKER_* variables), so it speaks
TLS when the broker does: it trusts HEALTHCHECK_CA_FILE (default: ca.crt beside
tls.cert_file, where cert-manager and deploy/tls/gen-certs.sh put the CA), names the server
HEALTHCHECK_SERVER_NAME (default localhost), and presents the broker's own certificate when
client certificates are required. The Dockerfile HEALTHCHECK and the Kubernetes exec probes run it.
"""

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.config import load_settings


def main() -> int:
    service = sys.argv[1] if len(sys.argv) > 1 else "keybroker.v1.KeyBroker"
    settings = load_settings(os.environ.get("KEYBROKER_CONFIG") or None)
    target = "127.0.0.1:" + settings.listen.rpartition(":")[2]
    tls = settings.tls
    if tls.cert_file:
        ca = os.environ.get("HEALTHCHECK_CA_FILE") or str(Path(tls.cert_file).parent / "ca.crt")
        mine = ((Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())
                if tls.require_client_cert else (None, None))
        creds = grpc.ssl_channel_credentials(Path(ca).read_bytes(), *mine)
        name = os.environ.get("HEALTHCHECK_SERVER_NAME") or "localhost"
        channel = grpc.secure_channel(target, creds,
                                      options=[("grpc.ssl_target_name_override", name)])
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        call = health_pb2_grpc.HealthStub(channel).Check.future(
            health_pb2.HealthCheckRequest(service=service), timeout=3)
        if call.exception() is not None:
            return 1
        return 0 if call.result().status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
