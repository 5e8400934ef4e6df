"""One trace across two OS processes: a call to a service whose authorization asks the auth service
(running as its own process) yields one trace with the parent/child edges, read back from the span store."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.auth.client import AuthClient
from services.mesh.channels import create_channel
from services.mesh.config import MeshSettings, load_settings
from services.mesh.security import secured_server
from services.mesh.spanstore import SpanStore
from services.mesh.telemetry import init_telemetry, shutdown_telemetry
from tests.conftest import AuthProcess
from tests.mesh.echo import PERMISSIONS, EchoClient, Req, registration


@pytest.mark.slow
async def test_call_chained_across_two_services_is_one_trace(auth_process: AuthProcess) -> None:
    settings = load_settings(MeshSettings, auth_process.env)
    init_telemetry("echo", auth_process.data_dir)
    anon = AuthClient(create_channel(auth_process.address, settings))
    token = (await anon.login("platform", "admin", auth_process.admin_password)).access_token
    server = secured_server("echo", settings, [registration()], PERMISSIONS, address="127.0.0.1:0")
    port = await server.start()
    await server.wait_ready()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await EchoClient(channel).unary("ReadDatasets")(
                Req(tenant="platform"), metadata=(("authorization", f"Bearer {token}"),)
            )
    finally:
        await server.stop(0)
        await anon.close()
        shutdown_telemetry()
    store = SpanStore(auth_process.data_dir / "traces")
    server_span = None
    for _ in range(50):  # the auth process exports on its own schedule (200 ms batches)
        candidates = [s for s in store.iter_spans() if s.name == "/test.v1.Echo/ReadDatasets" and s.kind == "SERVER"]
        if candidates:
            server_span = candidates[-1]
            spans = store.spans(server_span.trace_id)
            check_client = [s for s in spans if s.name.endswith("AuthService/CheckPermission") and s.kind == "CLIENT"]
            check_server = [s for s in spans if s.name.endswith("AuthService/CheckPermission") and s.kind == "SERVER"]
            if check_client and check_server:
                break
        await asyncio.sleep(0.2)
    assert server_span is not None, "the echo server span was not stored"
    assert check_client[0].parent_span_id == server_span.span_id
    assert check_server[0].parent_span_id == check_client[0].span_id
    assert check_server[0].service == "auth"
    assert {s.trace_id for s in (server_span, check_client[0], check_server[0])} == {server_span.trace_id}
