"""Prometheus metrics of the mesh runtime through a real grpc.aio server with every interceptor installed: RPC counts
by status code (refusals of the other interceptors included), latency histograms, in-flight RPCs, unknown methods
collapsed into one label, and the /metrics endpoint behind the mesh's mutual TLS."""

from __future__ import annotations

import asyncio
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from services.mesh.certs import init_certificates, issue_service_certificate
from services.mesh.channels import create_channel
from services.mesh.config import MeshSettings, load_settings
from services.mesh.metrics import (
    RPC_HANDLED,
    RPC_IN_FLIGHT,
    RPC_SECONDS,
    MetricsEndpoint,
    Scrape,
    ScrapedFigures,
    exported_names,
    scrape,
)
from services.mesh.security import secured_server
from tests.conftest import RunningAuth, free_port, start_auth
from tests.mesh.echo import PERMISSIONS, SERVICE, Batch, EchoClient, Req, registration


def handled(method: str, code: str) -> float:
    return RPC_HANDLED.labels(SERVICE, method, "unary", code)._value.get()


def observed(method: str, kind: str = "unary") -> float:
    return sum(b.get() for b in RPC_SECONDS.labels(SERVICE, method, kind)._buckets)


async def test_rpcs_are_counted_by_code_and_timed(auth: RunningAuth) -> None:
    server = secured_server("echo", auth.settings, [registration()], PERMISSIONS, address="127.0.0.1:0")
    port = await server.start()
    await server.wait_ready()
    before = {
        "ok": handled("Raise", "OK"),
        "not_found": handled("Raise", "NOT_FOUND"),
        "internal": handled("Raise", "INTERNAL"),
        "unauthenticated": handled("WhoAmI", "UNAUTHENTICATED"),
        "timed": observed("Raise"),
        "stream": observed("RaiseStream", "server_stream"),
        "unknown": RPC_HANDLED.labels("unknown", "unknown", "unknown", "UNIMPLEMENTED")._value.get(),
    }
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = EchoClient(channel)
            await echo.unary("Raise")(Req(tenant="fine"))
            await echo.unary("Raise")(Req(tenant="fine"))
            for kind in ("NotFound", "boom"):
                with pytest.raises(grpc.aio.AioRpcError):
                    await echo.unary("Raise")(Req(tenant=kind))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await echo.unary("WhoAmI")(Req())  # refused by the authentication interceptor, inside this one
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in echo.stream("RaiseStream")(Req(tenant="NotFound")):
                    pass
            for made_up in ("/test.v1.Echo/NoSuchMethod", "/evil.Service/x" + "y" * 50):
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await channel.unary_unary(made_up)(b"")
                assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)
    assert handled("Raise", "OK") - before["ok"] == 2
    assert handled("Raise", "NOT_FOUND") - before["not_found"] == 1
    assert handled("Raise", "INTERNAL") - before["internal"] == 1
    assert handled("WhoAmI", "UNAUTHENTICATED") - before["unauthenticated"] == 1
    assert observed("Raise") - before["timed"] == 4
    assert observed("RaiseStream", "server_stream") - before["stream"] == 1
    stream_codes = {
        code: RPC_HANDLED.labels(SERVICE, "RaiseStream", "server_stream", code)._value.get()
        for code in ("NOT_FOUND", "OK")
    }
    assert stream_codes["NOT_FOUND"] >= 1
    # Made-up method names are one label value, never their own.
    assert RPC_HANDLED.labels("unknown", "unknown", "unknown", "UNIMPLEMENTED")._value.get() - before["unknown"] == 2
    labels = {s.labels["grpc_method"] for m in RPC_HANDLED.collect() for s in m.samples}
    assert not any("NoSuchMethod" in label or "yyy" in label for label in labels)
    assert RPC_IN_FLIGHT.labels(SERVICE, "Raise")._value.get() == 0


async def test_in_flight_counts_rpcs_being_served(auth: RunningAuth) -> None:
    server = secured_server("echo", auth.settings, [registration()], PERMISSIONS, address="127.0.0.1:0")
    port = await server.start()
    await server.wait_ready()
    gauge = RPC_IN_FLIGHT.labels(SERVICE, "CountStream")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            release = asyncio.Event()

            async def slow_messages() -> AsyncIterator[Batch]:
                yield Batch()
                await release.wait()

            call = EchoClient(channel).count(streaming=True)(slow_messages())
            for _ in range(250):
                if gauge._value.get() == 1:
                    break
                await asyncio.sleep(0.02)
            assert gauge._value.get() == 1
            release.set()
            assert (await call).tenant.name == "counted 0"
    finally:
        await server.stop(0)
    assert gauge._value.get() == 0


async def test_metrics_off_records_nothing(auth: RunningAuth) -> None:
    settings = replace(auth.settings, metrics_addr="off")
    server = secured_server("echo", settings, [registration()], PERMISSIONS, address="127.0.0.1:0")
    port = await server.start()
    await server.wait_ready()
    before = handled("Raise", "OK")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await EchoClient(channel).unary("Raise")(Req(tenant="fine"))
    finally:
        await server.stop(0)
    assert handled("Raise", "OK") == before
    assert server.metrics is None


async def test_endpoint_serves_metrics_only_to_mesh_clients(auth: RunningAuth, tmp_path: Path) -> None:
    """With certificates: HTTPS with the service's certificate, a client certificate of the mesh's CA required."""
    certs = tmp_path / "certs"
    init_certificates(certs)
    issue_service_certificate(certs, "echo")
    settings = replace(
        auth.settings, certs_dir=str(certs), client_auth="require", metrics_addr=f"127.0.0.1:{free_port()}"
    )
    # A second auth beside the fixture's: addresses of its own (no tenant listener; the fixture's holds that port).
    mtls_auth = await start_auth(
        replace(settings, metrics_addr="", auth_addr=f"127.0.0.1:{free_port()}", auth_tenant_addr="off")
    )
    server = secured_server(
        "echo", replace(settings, auth_addr=mtls_auth.address), [registration()], PERMISSIONS, address="127.0.0.1:0"
    )
    port = await server.start()
    await server.wait_ready()
    try:
        channel = create_channel(f"127.0.0.1:{port}", settings, identity="cli")
        await EchoClient(channel).unary("Raise")(Req(tenant="fine"))
        await channel.close()
        url = f"https://{settings.metrics_addr}/metrics"
        seen = await asyncio.to_thread(scrape, url, certs, "cli")
        assert seen.value("grpc_server_handled_total", grpc_service=SERVICE, grpc_method="Raise", grpc_code="OK") >= 1
        assert seen.value("grpc_server_handling_seconds_count", grpc_method="Raise") >= 1
        assert "process_cpu_seconds_total" in seen.samples
        # No client certificate, or one of another CA: refused during the handshake.
        plain_tls = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionResetError)):
            await asyncio.to_thread(urllib.request.urlopen, url, timeout=5, context=plain_tls)
        other = tmp_path / "other"
        init_certificates(other)
        foreign = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        foreign.load_cert_chain(str(other / "cli.pem"), str(other / "cli-key.pem"))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionResetError)):
            await asyncio.to_thread(urllib.request.urlopen, url, timeout=5, context=foreign)
        with pytest.raises((urllib.error.URLError, ConnectionResetError)):
            await asyncio.to_thread(urllib.request.urlopen, f"http://{settings.metrics_addr}/metrics", timeout=5)
    finally:
        await server.stop(0)
        await mtls_auth.server.stop(0)
    # Stopped with the server: the port is free again.
    endpoint = MetricsEndpoint(settings.metrics_addr, None, "echo")
    endpoint.start()
    endpoint.stop()


def test_scraped_figures_merge_readers_and_survive_a_failing_one() -> None:
    registry = CollectorRegistry()
    figures = ScrapedFigures(
        ("gauge", "t_depth", "Depth.", ("pool",)),
        ("counter", "t_done", "Done.", ("state",)),
        registry=registry,
    )
    detach = figures.attach(lambda: [("t_depth", ("a",), 3), ("t_done", ("failed",), 2)])
    figures.attach(lambda: [("t_depth", ("b",), 1)])

    def broken() -> list[tuple[str, tuple[str, ...], float]]:
        raise RuntimeError("database gone")

    figures.attach(broken)
    from prometheus_client import generate_latest

    seen = Scrape(generate_latest(registry).decode())
    assert seen.value("t_depth") == 4 and seen.value("t_depth", pool="a") == 3
    assert seen.value("t_done_total", state="failed") == 2
    detach()
    assert Scrape(generate_latest(registry).decode()).value("t_depth") == 1
    assert {"t_depth", "t_done_total"} <= exported_names(registry)


def test_bad_metrics_address_fails_fast() -> None:
    with pytest.raises(ValueError, match="AIDC_METRICS_ADDR"):
        load_settings(MeshSettings, {"AIDC_METRICS_ADDR": "nine-thousand"})
    assert load_settings(MeshSettings, {"AIDC_METRICS_ADDR": "off"}).metrics_addr == "off"
