"""Live readiness probes (gRPC health, HTTP GET, TCP connect) answering SERVING, NOT_SERVING or DOWN."""

from __future__ import annotations

import asyncio
import enum
import http.client
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.mesh.channels import create_channel
from services.mesh.config import MeshSettings, parse_address
from services.platform.components import TRITON_CLIENT_FILES, ProbeSpec

__all__ = ["Health", "ProbeResult", "probe"]


class Health(enum.Enum):
    """What a probe saw: answering and ready, answering but not ready, or not answering at all."""

    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    DOWN = "DOWN"


@dataclass(frozen=True)
class ProbeResult:
    health: Health
    detail: str = ""


def _channel(spec: ProbeSpec, settings: MeshSettings) -> grpc.aio.Channel:
    if spec.tls_dir:  # Triton: mutual TLS with its own CA and the platform's client certificate
        ca, cert, key = ((Path(spec.tls_dir) / name).read_bytes() for name in TRITON_CLIENT_FILES)
        return grpc.aio.secure_channel(spec.target, grpc.ssl_channel_credentials(ca, key, cert))
    # The operator's identity: with AIDC_CERTS_DIR set the probe speaks mutual TLS like the CLI does, and accepts only
    # the component's own certificate (every service certificate also names localhost and 127.0.0.1).
    return create_channel(spec.target, settings, identity="cli", server_name=spec.server_name or None)


async def _probe_grpc(spec: ProbeSpec, settings: MeshSettings, timeout: float) -> ProbeResult:
    try:
        channel = _channel(spec, settings)
    except Exception as exc:  # a configuration problem (missing certificate, plaintext to a remote host)
        return ProbeResult(Health.DOWN, f"cannot connect: {exc}")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ProbeResult(Health.DOWN, exc.code().name)
        return ProbeResult(Health.NOT_SERVING, f"{exc.code().name}: {exc.details()}")
    finally:
        await channel.close(None)
    if response.status == health_pb2.HealthCheckResponse.SERVING:
        return ProbeResult(Health.SERVING)
    return ProbeResult(Health.NOT_SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


#: Probes go straight to the component: an HTTP(S)_PROXY from the environment must not catch loopback URLs.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _opener(url: str, tls_dir: Path | None) -> urllib.request.OpenerDirector:
    """Plain HTTP, or HTTPS trusting the mesh's CA and presenting the operator's (cli) client certificate."""
    if not url.startswith("https://") or tls_dir is None:
        return _OPENER
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    context.load_cert_chain(str(tls_dir / "cli.pem"), str(tls_dir / "cli-key.pem"))
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))


def _get(url: str, timeout: float, tls_dir: Path | None = None) -> ProbeResult:
    try:
        with _opener(url, tls_dir).open(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        return ProbeResult(Health.NOT_SERVING, f"HTTP {exc.code}")
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        return ProbeResult(Health.DOWN, str(getattr(reason, "strerror", None) or reason).lower())
    if status == 200:
        return ProbeResult(Health.SERVING)
    return ProbeResult(Health.NOT_SERVING, f"HTTP {status}")


async def _probe_tcp(target: str, timeout: float) -> ProbeResult:
    host, port = parse_address(target)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        return ProbeResult(Health.DOWN, (getattr(exc, "strerror", None) or type(exc).__name__).lower())
    writer.close()
    await writer.wait_closed()
    return ProbeResult(Health.SERVING)


async def probe(spec: ProbeSpec, settings: MeshSettings, timeout: float = 2.0) -> ProbeResult:
    """Asks a component once whether it is ready."""
    if spec.kind == "grpc":
        return await _probe_grpc(spec, settings, timeout)
    if spec.kind == "http":
        return await asyncio.to_thread(_get, spec.target, timeout, settings.tls_dir())
    return await _probe_tcp(spec.target, timeout)
