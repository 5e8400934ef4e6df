"""The shared runtime through a real grpc.aio server with every interceptor installed: error mapping,
authentication, authorization by permission table, deadline and identity forwarding."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from services.mesh.channels import create_channel
from services.mesh.client import ServiceClient
from services.mesh.errors import INTERNAL_MESSAGE, MAX_MESSAGE_BYTES, Unavailable
from services.mesh.security import secured_server
from services.mesh.server import MeshServer
from tests.conftest import RunningAuth
from tests.mesh.echo import ERRORS, PERMISSIONS, EchoClient, Req, registration


@pytest.fixture
async def echo(auth: RunningAuth) -> AsyncIterator[tuple[MeshServer, EchoClient]]:
    server = secured_server("echo", auth.settings, [registration()], PERMISSIONS, address="127.0.0.1:0")
    port = await server.start()
    await server.wait_ready()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield server, EchoClient(channel)
    await channel.close()
    await server.stop(0)


@pytest.fixture
async def tokens(auth: RunningAuth) -> dict[str, str]:
    """Access tokens: platform admin, a developer of acme, a developer of globex."""
    anon = auth.client()
    admin_token = (await anon.login("platform", "admin", auth.admin_password)).access_token
    admin = auth.client(admin_token)
    out = {"admin": admin_token}
    for tenant in ("acme", "globex"):
        await admin.create_tenant(tenant)
        await admin.create_user(tenant, "dev", "correct horse battery", ["developer"])
        out[tenant] = (await anon.login(tenant, "dev", "correct horse battery")).access_token
    return out


def _auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.mark.parametrize("name", sorted(ERRORS))
async def test_domain_error_maps_to_its_status(echo: tuple[MeshServer, EchoClient], name: str) -> None:
    _, client = echo
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.unary("Raise")(Req(tenant=name))
    assert info.value.code() == ERRORS[name].code
    assert info.value.details() == f"{name} raised on purpose"


async def test_a_call_the_server_cuts_off_is_unavailable_and_retried_when_idempotent(
    echo: tuple[MeshServer, EchoClient],
) -> None:
    """A received CANCELLED means the other side ended the call (a caller's own cancel never arrives as a status):
    typed clients raise it as Unavailable, not as Aborted (no concurrent change won), and retry idempotent calls."""
    _, raw = echo
    client = ServiceClient(raw._channel, backoff_seconds=0.01)
    with pytest.raises(Unavailable, match="cut off by the other side"):
        await client._unary(raw.unary("Raise"), Req(tenant="cut-off-once:plain"))
    reply = await client._unary(raw.unary("Raise"), Req(tenant="cut-off-once:idempotent"), idempotent=True)
    assert reply.tenant.name == "ok"


async def test_unexpected_exception_is_internal_and_leaks_nothing(
    echo: tuple[MeshServer, EchoClient], caplog: pytest.LogCaptureFixture
) -> None:
    _, client = echo
    with caplog.at_level(logging.ERROR, logger="services.mesh.interceptors"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.unary("Raise")(Req(tenant="boom"))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == INTERNAL_MESSAGE
    assert "hunter2" not in str(info.value.debug_error_string())
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and "hunter2" in str(logged[0].exc_info[1])


async def test_errors_mid_stream_are_mapped(echo: tuple[MeshServer, EchoClient]) -> None:
    _, client = echo
    call = client.stream("RaiseStream")(Req(tenant="DataLoss"))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for item in call:
            received.append(item.tenant.name)
    assert received == ["first"]
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    call = client.stream("RaiseStream")(Req(tenant="whatever"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.INTERNAL and info.value.details() == INTERNAL_MESSAGE


async def test_a_message_quoting_a_huge_input_keeps_its_status(echo: tuple[MeshServer, EchoClient]) -> None:
    """Found by fuzzing: a status message quoting a 70,000-character name overflowed gRPC's metadata limit, and the
    caller got RESOURCE_EXHAUSTED instead of NOT_FOUND. Messages are cut to MAX_MESSAGE_BYTES."""
    _, client = echo
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.unary("Raise")(Req(tenant="NotFound:" + "x" * 70_000))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    details = info.value.details() or ""
    assert details.startswith("no such thing: NotFound:xxx") and len(details.encode()) <= MAX_MESSAGE_BYTES


@pytest.mark.parametrize("raw", [b"\x0a\x05ab", b"\xff\xff\xff", b"\x0a"])
async def test_request_bytes_that_do_not_decode_are_invalid_argument(
    echo: tuple[MeshServer, EchoClient], tokens: dict[str, str], raw: bytes
) -> None:
    """Truncated or garbage request bytes: grpc itself would answer UNKNOWN with the parser's exception text (found by
    fuzzing); the runtime says INVALID_ARGUMENT, for a unary RPC and for any message of a request stream, before
    anything else runs."""
    server, _ = echo
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method in ("Raise", "WhoAmI"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(f"/test.v1.Echo/{method}")(raw, metadata=_auth(tokens["admin"]), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "DecodeError" not in (info.value.details() or "")
        valid = Req(tenant="acme").SerializeToString()
        upload = channel.stream_unary("/test.v1.Echo/UploadDataset")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await upload(iter([valid, raw]), metadata=_auth(tokens["acme"]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await upload(iter([valid, valid]), metadata=_auth(tokens["acme"]), timeout=10)


async def test_protected_rpc_without_credentials_is_unauthenticated(
    echo: tuple[MeshServer, EchoClient],
) -> None:
    _, client = echo
    for method in ("WhoAmI", "ReadDatasets"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.unary(method)(Req(tenant="acme"))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("header", ["Basic abc", "Bearer ", "Bearer not.a.jwt", "Bearer " + "x" * 50])
async def test_malformed_authorization_is_unauthenticated(echo: tuple[MeshServer, EchoClient], header: str) -> None:
    _, client = echo
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.unary("WhoAmI")(Req(), metadata=(("authorization", header),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_rpc_missing_from_permission_table_is_refused(
    echo: tuple[MeshServer, EchoClient], tokens: dict[str, str]
) -> None:
    _, client = echo
    for who in ("admin", "acme"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.unary("Unlisted")(Req(tenant="acme"), metadata=_auth(tokens[who]))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "no permission rule" in info.value.details()


async def test_tenant_rule_allows_own_tenant_and_denies_others(
    echo: tuple[MeshServer, EchoClient], tokens: dict[str, str]
) -> None:
    _, client = echo
    read = client.unary("ReadDatasets")
    assert (await read(Req(tenant="acme"), metadata=_auth(tokens["acme"]))).tenant.name == "read acme"
    # An empty tenant means the caller's own.
    assert (await read(Req(), metadata=_auth(tokens["acme"]))).tenant.name == "read "
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await read(Req(tenant="globex"), metadata=_auth(tokens["acme"]))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The platform admin may act in every tenant.
    assert (await read(Req(tenant="globex"), metadata=_auth(tokens["admin"]))).tenant.name == "read globex"


async def test_client_streaming_rpc_is_authorized_by_its_first_message(
    echo: tuple[MeshServer, EchoClient], tokens: dict[str, str]
) -> None:
    _, client = echo

    async def messages(tenant: str) -> AsyncIterator[Req]:
        for _ in range(3):
            yield Req(tenant=tenant)

    reply = await client.upload()(messages("acme"), metadata=_auth(tokens["acme"]))
    assert reply.tenant.name == "received 3"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.upload()(messages("globex"), metadata=_auth(tokens["acme"]))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_identity_and_deadline_are_forwarded_on_internal_calls(
    echo: tuple[MeshServer, EchoClient], auth: RunningAuth, tokens: dict[str, str]
) -> None:
    """A channel from create_channel, used while serving an RPC, carries the end user's token and deadline."""
    server, _ = echo
    from services.mesh.identity import current_principal
    from services.mesh.interceptors import current_deadline

    channel = create_channel(f"127.0.0.1:{server.port}", auth.settings)
    client = EchoClient(channel)
    principal = await server.verifier.verify(tokens["acme"])
    import time

    principal_token = current_principal.set(principal)
    deadline_token = current_deadline.set(time.monotonic() + 5)
    try:
        reply = await client.unary("WhoAmI")(Req())
    finally:
        current_principal.reset(principal_token)
        current_deadline.reset(deadline_token)
    assert reply.tenant.name == "user:acme/dev|deadline"
    # Without a principal in context nothing is forwarded, so the call is anonymous.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.unary("WhoAmI")(Req())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await channel.close()


def test_trace_filter_is_decided_once_per_method_and_bounded() -> None:
    from services.mesh import server as mesh_server

    calls: list[str] = []

    def condition(details: grpc.HandlerCallDetails) -> bool:
        calls.append(details.method)
        return details.method.startswith("/aidc.")

    decide = mesh_server._per_method(condition)

    class Details:
        def __init__(self, method: str) -> None:
            self.method = method

    assert [decide(Details("/aidc.x.v1.X/A")) for _ in range(3)] == [True] * 3  # type: ignore[arg-type]
    assert decide(Details("/grpc.health.v1.Health/Check")) is False  # type: ignore[arg-type]
    assert calls == ["/aidc.x.v1.X/A", "/grpc.health.v1.Health/Check"]
    for i in range(mesh_server._MAX_CACHED_METHODS + 10):
        decide(Details(f"/junk/{i}"))  # type: ignore[arg-type]
    assert decide(Details("/aidc.x.v1.X/B")) is True  # type: ignore[arg-type]
    assert decide(Details("/aidc.x.v1.X/B")) is True  # type: ignore[arg-type]
    assert calls.count("/aidc.x.v1.X/B") == 2  # over the bound: decided each time, never cached


async def test_a_stop_step_that_hangs_is_abandoned_and_named_and_the_next_still_runs(
    auth: RunningAuth, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop hook that never returns (a peer that never answers; here one that even swallows its cancellation, as a
    follower loop once did) no longer hangs the service's stop: it is cancelled after the bound, named in the log,
    and the hooks after it run."""
    monkeypatch.setattr("services.mesh.server._STOP_HOOK_SECONDS", 0.5)
    ran: list[str] = []

    async def stuck() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            ran.append("cancelled")
            await asyncio.sleep(3600)  # swallows it, and goes on waiting

    async def after() -> None:
        ran.append("after")

    server = secured_server(
        "echo", auth.settings, [registration()], PERMISSIONS, address="127.0.0.1:0", on_stop=[stuck, after]
    )
    await server.start()
    with caplog.at_level(logging.ERROR, logger="services.mesh.server"):
        await asyncio.wait_for(server.stop(0), 30)
    assert "after" in ran
    assert "stop step" in caplog.text and "stuck" in caplog.text and "abandoned" in caplog.text
