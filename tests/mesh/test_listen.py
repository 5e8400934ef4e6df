"""A service's port is its own. gRPC servers bind with SO_REUSEPORT by default, so a second process on a service's
address (a stale instance, a second `aidc up`, any process of the same user) would bind it too and silently answer
a share of its connections. Mesh servers turn that off: the second start fails, clearly, and the first serves on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.mesh.security import secured_server
from services.mesh.server import AddressUnavailable
from tests.conftest import AuthProcess, RunningAuth, auth_process, start_service_process, stop_process  # noqa: F401
from tests.mesh.echo import PERMISSIONS, registration


async def _serving_on_new_connections(address: str, connections: int) -> int:
    """How many of ``connections`` fresh connections' health checks answer SERVING."""
    serving = 0
    for _ in range(connections):
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            serving += reply.status == health_pb2.HealthCheckResponse.SERVING
    return serving


async def test_a_second_server_on_a_services_address_fails_to_start_and_the_first_serves_on(
    auth: RunningAuth,
) -> None:
    first = secured_server("echo", auth.settings, [registration()], PERMISSIONS, address="127.0.0.1:0")
    port = await first.start()
    await first.wait_ready()
    second = secured_server("echo", auth.settings, [registration()], PERMISSIONS, address=f"127.0.0.1:{port}")
    try:
        with pytest.raises(AddressUnavailable, match=f"echo cannot listen on 127.0.0.1:{port} \\(mesh path\\)"):
            await second.start()
        assert await _serving_on_new_connections(f"127.0.0.1:{port}", 5) == 5
    finally:
        await first.stop(0)


@pytest.mark.slow
async def test_a_second_service_process_on_the_same_address_exits_and_names_the_port(
    auth_process: AuthProcess,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The case `aidc up` and operators meet: another auth, with data of its own, configured onto the running one's
    address. It exits with status 1 and says why; every new connection still reaches the running auth."""
    stale = dict(auth_process.env, AIDC_DATA_DIR=str(tmp_path / "stale-data"))
    log = tmp_path / "stale-auth.log"
    process = start_service_process("auth", stale, log)
    try:
        assert await asyncio.to_thread(process.wait, 60) == 1
    finally:
        stop_process(process)
    assert f"auth cannot listen on {auth_process.address} (mesh path)" in log.read_text()
    assert await _serving_on_new_connections(auth_process.address, 20) == 20
