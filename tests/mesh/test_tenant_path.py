"""The two paths into a service, through real servers with the mesh's certificates: the tenant path (TLS with only
the CA certificate, a bearer token) reaches every tenant RPC, grants no service identity whatever certificate the
client presents, and refuses every mesh-only RPC; the mesh path (mutual TLS) keeps serving the services.

The real auth and billing services show it for the RPCs the issue names (RecordUsage, CheckPermission for another
subject); stand-in servicers (tests/mesh/standins.py) under the services' real permission tables show it for every
RPC of every service, since the refusal happens in the mesh runtime before any servicer runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.auth.config import AuthSettings
from services.gen.aidc.auth.v1 import auth_service_pb2 as auth_pb
from services.gen.aidc.auth.v1 import auth_service_pb2_grpc
from services.gen.aidc.billing.v1 import billing_service_pb2 as billing_pb
from services.gen.aidc.billing.v1 import billing_service_pb2_grpc
from services.mesh.authz import Scope
from services.mesh.certs import init_certificates, issue_client_certificate
from services.mesh.config import MeshSettings, load_settings
from services.mesh.security import mesh_security, secured_server
from services.mesh.server import MeshServer
from tests.billing.conftest import RunningBilling, start_billing
from tests.conftest import ADMIN_PASSWORD, RunningAuth, free_port, start_auth, tenant_addresses
from tests.mesh.standins import Calls, all_rules, message_class, method_descriptor, registrations

PASSWORD = "correct horse battery"
#: What the stand-in server has no rule for (they are the gateway's and the runtime's own).
MESH_ONLY = sorted(method for method, rule in all_rules().items() if rule.mesh_only)
TENANT_FACING = sorted(method for method, rule in all_rules().items() if not rule.mesh_only)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    init_certificates(directory)
    issue_client_certificate(directory, "laptop")
    return directory


@pytest.fixture
async def mtls_auth(tmp_path: Path, certs: Path) -> AsyncIterator[RunningAuth]:
    settings = AuthSettings.from_env(
        {
            "AIDC_DATA_DIR": str(tmp_path / "auth-data"),
            "AIDC_AUTH_ADDR": f"127.0.0.1:{free_port()}",
            "AIDC_CERTS_DIR": str(certs),
            "AIDC_AUTH_ARGON2_TIME_COST": "1",
            "AIDC_AUTH_ARGON2_MEMORY_KIB": "1024",
            **tenant_addresses(),
        }
    )
    running = await start_auth(settings)
    yield running
    await running.server.stop(0)


@pytest.fixture
async def mtls_billing(mtls_auth: RunningAuth, tmp_path: Path, certs: Path) -> AsyncIterator[RunningBilling]:
    running = await start_billing(mtls_auth, tmp_path / "billing-data", AIDC_CERTS_DIR=str(certs))
    yield running
    await running.server.stop(0)


def tenant_channel(port: int, certs: Path, client: str | None = None) -> grpc.aio.Channel:
    """What a tenant holds: the CA certificate (and, to show it grants nothing, maybe a certificate of ``client``)."""
    key = (certs / f"{client}-key.pem").read_bytes() if client else None
    chain = (certs / f"{client}.pem").read_bytes() if client else None
    credentials = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes(), key, chain)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


def mesh_channel(port: int, certs: Path, identity: str) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(),
        (certs / f"{identity}-key.pem").read_bytes(),
        (certs / f"{identity}.pem").read_bytes(),
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def _login(channel: grpc.aio.Channel, tenant: str, name: str, password: str) -> str:
    stub = auth_service_pb2_grpc.AuthServiceStub(channel)
    reply = await stub.Login(auth_pb.LoginRequest(tenant=tenant, name=name, password=password), timeout=30)
    return str(reply.tokens.access_token)


async def test_the_tenant_path_needs_only_the_ca_certificate_and_a_token(mtls_auth: RunningAuth, certs: Path) -> None:
    server = mtls_auth.server
    assert server.tenant_port and server.tenant_port != server.port
    async with tenant_channel(server.tenant_port, certs) as channel:
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        token = await _login(channel, "platform", "admin", ADMIN_PASSWORD)
        me = await stub.WhoAmI(auth_pb.WhoAmIRequest(), metadata=bearer(token), timeout=10)
        assert me.subject == "user:platform/admin"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.WhoAmI(auth_pb.WhoAmIRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The mesh path wants a client certificate: with the CA alone a tenant cannot even connect there.
    async with tenant_channel(server.port, certs) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as unreachable:
            await auth_service_pb2_grpc.AuthServiceStub(channel).GetJwks(auth_pb.GetJwksRequest(), timeout=10)
        assert unreachable.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_token_on_the_tenant_path_never_acts_as_a_service(
    mtls_auth: RunningAuth, mtls_billing: RunningBilling, certs: Path
) -> None:
    """The platform admin's own token, with billing's own service certificate presented as well: RecordUsage and a
    permission check about another subject are refused on the tenant path, and served on the mesh path."""
    event = billing_pb.UsageEvent(
        id="e-1", source="serving", tenant="acme", meter="inference_requests", quantity="1", time=_now()
    )
    record = billing_pb.RecordUsageRequest(tenant="acme", events=[event])
    check = auth_pb.CheckPermissionRequest(
        check=auth_pb.PermissionCheck(subject="user:acme/alice", tenant="acme", resource="datasets", action="read")
    )
    token = mtls_billing.admin_token
    async with tenant_channel(mtls_billing.server.tenant_port, certs, client="billing") as channel:
        stub = billing_service_pb2_grpc.BillingServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RecordUsage(record, metadata=bearer(token), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "mesh services only" in (refused.value.details() or "")
    async with tenant_channel(mtls_auth.server.tenant_port, certs, client="billing") as channel:
        auth_stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        for metadata in (bearer(token), ()):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await auth_stub.CheckPermission(check, metadata=metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Nothing was recorded; on the mesh path the serving service records it and auth answers billing.
    async with mesh_channel(mtls_billing.server.port, certs, "billing") as channel:
        stub = billing_service_pb2_grpc.BillingServiceStub(channel)
        usage = await stub.QueryUsage(
            billing_pb.QueryUsageRequest(tenant="acme", meter="inference_requests"), metadata=bearer(token), timeout=10
        )
        assert not usage.buckets
    async with mesh_channel(mtls_billing.server.port, certs, "serving") as channel:
        reply = await billing_service_pb2_grpc.BillingServiceStub(channel).RecordUsage(record, timeout=10)
        assert [r.status for r in reply.results] == [billing_pb.USAGE_EVENT_STATUS_ACCEPTED]
    async with mesh_channel(mtls_auth.server.port, certs, "billing") as channel:
        decided = await auth_service_pb2_grpc.AuthServiceStub(channel).CheckPermission(check, timeout=10)
        assert decided.allowed is False  # asked as service:billing about alice (who does not exist): served


async def test_a_client_certificate_on_the_tenant_path_grants_nothing(mtls_auth: RunningAuth, certs: Path) -> None:
    """Whatever certificate a client presents there (a service's own, or a client certificate of the mesh CA), the
    tenant path does not ask for it and grants no identity: without a token only public RPCs answer."""
    for presented in ("billing", "training", "cli", "laptop"):
        async with tenant_channel(mtls_auth.server.tenant_port, certs, client=presented) as channel:
            stub = auth_service_pb2_grpc.AuthServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.WhoAmI(auth_pb.WhoAmIRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, presented
            assert (await stub.GetJwks(auth_pb.GetJwksRequest(), timeout=10)).jwks_json
    # The same certificate on the mesh path is the service's identity.
    async with mesh_channel(mtls_auth.server.port, certs, "billing") as channel:
        me = await auth_service_pb2_grpc.AuthServiceStub(channel).WhoAmI(auth_pb.WhoAmIRequest(), timeout=10)
        assert me.subject == "service:billing"


# -- every RPC of every service, through stand-in servicers under the real permission tables ----------------------


@pytest.fixture(params=["mtls", "plaintext"])
async def standin(
    request: pytest.FixtureRequest, mtls_auth: RunningAuth, certs: Path, tmp_path: Path
) -> AsyncIterator[tuple[MeshServer, Calls, str, Path | None]]:
    """A server carrying every aidc service's RPCs (stand-ins) under their real rules, verified by the real auth:
    with the mesh's certificates, or plaintext (dev mode, where the tenant path is a plaintext port of its own)."""
    env = {
        "AIDC_DATA_DIR": str(tmp_path / "standin"),
        "AIDC_AUTH_ADDR": mtls_auth.address,
        "AIDC_CERTS_DIR": str(certs),
    }
    mesh = load_settings(MeshSettings, env)
    # In dev mode the listeners are plaintext (the tenant path a plaintext port of its own); auth is still reached
    # over mutual TLS.
    settings = mesh if request.param == "mtls" else load_settings(MeshSettings, {**env, "AIDC_CERTS_DIR": "off"})
    calls = Calls()
    table = all_rules()
    server = secured_server(
        "storage",  # any service certificate serves here; its name does not matter to the rules
        settings,
        registrations(table, calls),
        table,
        address="127.0.0.1:0",
        tenant_address="127.0.0.1:0",
        security=mesh_security(mesh, "storage"),
    )
    await server.start()
    await server.wait_ready()
    yield server, calls, request.param, certs if request.param == "mtls" else None
    await server.stop(0)


async def _admin_token(auth: RunningAuth) -> str:
    async with grpc.aio.secure_channel(f"127.0.0.1:{auth.server.tenant_port}", _ca(auth)) as channel:
        return await _login(channel, "platform", "admin", ADMIN_PASSWORD)


def _ca(auth: RunningAuth) -> grpc.ChannelCredentials:
    tls_dir = auth.settings.tls_dir()
    assert tls_dir is not None
    return grpc.ssl_channel_credentials((tls_dir / "ca.pem").read_bytes())


def _channel(port: int, certs: Path | None, client: str | None = None) -> grpc.aio.Channel:
    if certs is None:
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return tenant_channel(port, certs, client) if client != "mesh" else mesh_channel(port, certs, "training")


async def _call(channel: grpc.aio.Channel, method: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    descriptor = method_descriptor(method)
    request = message_class(descriptor.input_type)()
    response = message_class(descriptor.output_type)
    kwargs = {"request_serializer": type(request).SerializeToString, "response_deserializer": response.FromString}
    try:
        if descriptor.client_streaming and descriptor.server_streaming:
            async for _ in channel.stream_stream(method, **kwargs)(iter([request]), metadata=metadata, timeout=10):
                pass
        elif descriptor.client_streaming:
            await channel.stream_unary(method, **kwargs)(iter([request]), metadata=metadata, timeout=10)
        elif descriptor.server_streaming:
            async for _ in channel.unary_stream(method, **kwargs)(request, metadata=metadata, timeout=10):
                pass
        else:
            await channel.unary_unary(method, **kwargs)(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_every_mesh_only_rpc_is_refused_on_the_tenant_path(
    standin: tuple[MeshServer, Calls, str, Path | None], mtls_auth: RunningAuth
) -> None:
    server, calls, mode, certs = standin
    assert MESH_ONLY, "no RPC is mesh-only"
    admin = await _admin_token(mtls_auth)
    refused = {}
    client = "billing" if certs is not None else None  # a service's own certificate, presented for nothing
    async with _channel(server.tenant_port, certs, client) as channel:
        for method in MESH_ONLY:
            for metadata in (bearer(admin), ()):
                refused[method, bool(metadata)] = await _call(channel, method, metadata)
    assert {key: code for key, code in refused.items() if code != grpc.StatusCode.PERMISSION_DENIED} == {}
    assert calls.seen == []
    if certs is None:
        return
    # On the mesh path a service (here: training's certificate, forwarding the admin's token) reaches each of them.
    async with _channel(server.port, certs, "mesh") as channel:
        reached = {method: await _call(channel, method, bearer(admin)) for method in MESH_ONLY}
    assert set(reached.values()) == {grpc.StatusCode.OK}, reached
    assert set(calls.seen) == {(m, "user:platform/admin", "training") for m in MESH_ONLY}


async def test_every_tenant_rpc_is_served_on_the_tenant_path_with_a_token_only(
    standin: tuple[MeshServer, Calls, str, Path | None], mtls_auth: RunningAuth
) -> None:
    server, calls, mode, certs = standin
    admin = await _admin_token(mtls_auth)
    rules = dict(all_rules().items())
    client = "serving" if certs is not None else None
    async with _channel(server.tenant_port, certs, client) as channel:
        with_token = {method: await _call(channel, method, bearer(admin)) for method in TENANT_FACING}
        without = {method: await _call(channel, method, ()) for method in TENANT_FACING}
    assert {m: c for m, c in with_token.items() if c != grpc.StatusCode.OK} == {}
    expected_without = {
        m: grpc.StatusCode.OK if rules[m].scope is Scope.PUBLIC else grpc.StatusCode.UNAUTHENTICATED
        for m in TENANT_FACING
    }
    assert without == expected_without
    # Nobody reached a handler as a service on the tenant path, whatever certificate was presented.
    assert {peer for _, _, peer in calls.seen} == {None}
    assert {subject for _, subject, _ in calls.seen} == {"user:platform/admin", None}


def test_tenant_listener_settings() -> None:
    settings = load_settings(MeshSettings, {"AIDC_BILLING_TENANT_ADDR": "off"})
    assert settings.tenant_address_of("auth") == "127.0.0.1:50041"
    assert settings.tenant_address_of("billing") is None
    with pytest.raises(ValueError, match="AIDC_SERVING_TENANT_ADDR has the port of AIDC_SERVING_ADDR"):
        load_settings(MeshSettings, {"AIDC_SERVING_TENANT_ADDR": "localhost:50056"})  # both bind AIDC_HOST:50056
    with pytest.raises(ValueError, match="AIDC_AUTH_TENANT_ADDR"):
        load_settings(MeshSettings, {"AIDC_AUTH_TENANT_ADDR": "nowhere"})


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp
