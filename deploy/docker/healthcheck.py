#!/usr/bin/env python3
"""Health check of an aidc service container: gRPC health over the mesh's own TLS, with the pod's own certificate.

Kubernetes' built-in gRPC probes speak plaintext and cannot present a client certificate, while a mesh service's port
requires one (AIDC_CLIENT_AUTH=require). This probe runs inside the container, so it can: it reads the same AIDC_*
settings as the service, connects to 127.0.0.1 (in every service certificate `aidc certs` issues) and presents the
service's certificate. Health is a public RPC, so no token is needed.

    aidc-healthcheck [SERVICE] [--live]

SERVICE defaults to $AIDC_SERVICE. Exit 0 when the service answers SERVING (with --live: answers at all, so a service
still waiting for its dependencies, or draining, is not restarted), 1 otherwise.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.mesh.config import MeshSettings, load_settings, parse_address

_TIMEOUT_SECONDS = 3.0


def _channel(settings: MeshSettings, service: str, port: int) -> grpc.Channel:
    target = f"127.0.0.1:{port}"
    tls_dir = settings.tls_dir()
    if tls_dir is None:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls_dir / "ca.pem").read_bytes(),
        private_key=(tls_dir / f"{service}-key.pem").read_bytes(),
        certificate_chain=(tls_dir / f"{service}.pem").read_bytes(),
    )
    return grpc.secure_channel(target, credentials)


def check(service: str, live: bool) -> bool:
    """True when ``service`` in this container answers SERVING (``live``: answers at all)."""
    settings = load_settings(MeshSettings)
    _, port = parse_address(settings.address_of(service))
    with _channel(settings, service, port) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=_TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            print(f"{service}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{service}: {status}")
    return live or response.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str]) -> int:
    live = "--live" in argv
    names = [arg for arg in argv if arg != "--live"]
    service = names[0] if names else os.environ.get("AIDC_SERVICE", "")
    if not service:
        print("usage: aidc-healthcheck [SERVICE] [--live] (or set AIDC_SERVICE)", file=sys.stderr)
        return 2
    try:
        return 0 if check(service, live) else 1
    except (OSError, ValueError) as exc:  # unreadable certificates, bad settings: unhealthy, and say why
        print(f"{service}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
