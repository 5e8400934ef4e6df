"""Readiness probes against real servers: a grpc.aio health service, an HTTP server, closed ports."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from services.mesh.config import MeshSettings
from services.platform.components import ProbeSpec
from services.platform.probes import Health, probe

SETTINGS = MeshSettings(certs_dir="off")  # plaintext test servers, whatever .aidc holds


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_grpc_health_probe_follows_overall_status() -> None:
    server = grpc.aio.server()
    servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        spec = ProbeSpec("grpc", f"127.0.0.1:{port}")
        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert (await probe(spec, SETTINGS)).health is Health.NOT_SERVING
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert (await probe(spec, SETTINGS)).health is Health.SERVING
    finally:
        await server.stop(0)
    assert (await probe(spec, SETTINGS, timeout=1.0)).health is Health.DOWN


async def test_grpc_probe_of_a_server_without_health_is_not_serving() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        result = await probe(ProbeSpec("grpc", f"127.0.0.1:{port}"), SETTINGS)
    finally:
        await server.stop(0)
    assert result.health is Health.NOT_SERVING
    assert "UNIMPLEMENTED" in result.detail


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/ready" else 400)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_http_probe(http_server: str) -> None:
    assert (await probe(ProbeSpec("http", f"http://{http_server}/ready"), SETTINGS)).health is Health.SERVING
    not_ready = await probe(ProbeSpec("http", f"http://{http_server}/v2/health/ready"), SETTINGS)
    assert (not_ready.health, not_ready.detail) == (Health.NOT_SERVING, "HTTP 400")
    down = await probe(ProbeSpec("http", f"http://127.0.0.1:{closed_port()}/healthz"), SETTINGS)
    assert (down.health, down.detail) == (Health.DOWN, "connection refused")


async def test_tcp_probe(http_server: str) -> None:
    assert (await probe(ProbeSpec("tcp", http_server), SETTINGS)).health is Health.SERVING
    assert (await probe(ProbeSpec("tcp", f"127.0.0.1:{closed_port()}"), SETTINGS)).health is Health.DOWN
