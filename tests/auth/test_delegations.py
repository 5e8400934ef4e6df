"""Job delegations: a user lets a mesh service act for it in one tenant for one job. The tokens they give are bound
to that tenant (in auth and in other services), cannot mint further credentials, end when the delegation is revoked
or the user disabled, and with mutual TLS only the delegate service itself may request and use one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import cast

import grpc
import pytest

from services.auth.client import AuthClient
from services.auth.config import AuthSettings
from services.cli.session import BearerToken
from services.mesh.certs import init_certificates
from services.mesh.channels import create_channel
from services.mesh.errors import InvalidArgument, PermissionDenied, Unauthenticated
from services.mesh.security import secured_server
from tests.conftest import RunningAuth, start_auth
from tests.mesh.echo import PERMISSIONS, EchoClient, Req, registration

PASSWORD = "correct horse battery"


async def _setup(auth: RunningAuth) -> tuple[AuthClient, str]:
    """acme and globex; acme/dev a developer. The admin client and dev's token."""
    admin = auth.client((await auth.client().login("platform", "admin", auth.admin_password)).access_token)
    for tenant in ("acme", "globex"):
        await admin.create_tenant(tenant)
    await admin.create_user("acme", "dev", PASSWORD, ["developer"])
    return admin, (await auth.client().login("acme", "dev", PASSWORD)).access_token


@pytest.fixture
async def echo_port(auth: RunningAuth) -> AsyncIterator[int]:
    settings = replace(auth.settings, revocation_refresh_seconds=0.5)
    server = secured_server("echo", settings, [registration()], PERMISSIONS, address="127.0.0.1:0")
    port = await server.start()
    await server.wait_ready()
    yield port
    await server.stop(0)


async def _read(port: int, token: str, tenant: str) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await EchoClient(channel).unary("ReadDatasets")(
                Req(tenant=tenant), metadata=(("authorization", f"Bearer {token}"),), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return error.code().name
    return "ok"


async def test_a_delegated_token_acts_for_its_user_in_its_tenant_only(auth: RunningAuth, echo_port: int) -> None:
    admin, _ = await _setup(auth)
    # The platform admin may read every tenant; a delegation for a job in acme may read acme only.
    created = await admin.create_delegation("acme", "job-1", "training")
    assert (created.delegation.subject, created.delegation.tenant) == ("user:platform/admin", "acme")
    token = (await auth.client().exchange_delegation(created.secret)).access_token
    delegated = auth.client(token)
    assert (await delegated.whoami()).subject == "user:platform/admin"
    assert await _read(echo_port, token, "acme") == "ok"
    assert await _read(echo_port, token, "globex") == "PERMISSION_DENIED"
    assert await delegated.check_permission("", "acme", "datasets", "read")
    assert not await delegated.check_permission("", "globex", "datasets", "read")
    with pytest.raises(PermissionDenied):
        await delegated.create_tenant("newco")  # a platform right, outside the delegation's tenant
    # It cannot turn itself into a lasting credential.
    with pytest.raises(PermissionDenied, match="delegation"):
        await delegated.create_api_key("acme")
    with pytest.raises(PermissionDenied, match="delegation"):
        await delegated.create_delegation("acme", "job-2", "training")
    with pytest.raises(PermissionDenied, match="delegation"):
        await delegated.change_password(PASSWORD, "some other passphrase")

    await auth.client().revoke_delegation(created.secret)
    await auth.client().revoke_delegation(created.secret)  # idempotent
    with pytest.raises(Unauthenticated, match="revoked"):
        await auth.client().exchange_delegation(created.secret)
    with pytest.raises(Unauthenticated, match="revoked"):
        await delegated.whoami()
    actions = [e.action for e in await admin.list_audit_events("acme", 100)]
    assert "delegation.create" in actions and "delegation.revoke" in actions


async def test_disabling_the_user_revokes_its_delegations(auth: RunningAuth) -> None:
    admin, dev_token = await _setup(auth)
    created = await auth.client(dev_token).create_delegation("acme", "job-1", "training")
    token = (await auth.client().exchange_delegation(created.secret)).access_token
    await admin.disable_user("acme", "user:acme/dev")
    with pytest.raises(Unauthenticated):
        await auth.client(token).whoami()
    await admin.enable_user("acme", "user:acme/dev")
    with pytest.raises(Unauthenticated, match="revoked"):
        await auth.client().exchange_delegation(created.secret)


async def test_bad_delegation_requests(auth: RunningAuth) -> None:
    admin, dev_token = await _setup(auth)
    dev = auth.client(dev_token)
    for call, error, fragment in [
        (dev.create_delegation("acme", "", "training"), InvalidArgument, "required"),
        (dev.create_delegation("acme", "job", "auth"), InvalidArgument, "mesh service"),
        (dev.create_delegation("acme", "job", "nobody"), InvalidArgument, "mesh service"),
        (dev.create_delegation("acme", "j" * 129, "training"), InvalidArgument, "128"),
        (dev.create_delegation("acme", "job", "training", ttl_seconds=-1), InvalidArgument, "ttl_seconds"),
        (dev.create_delegation("globex", "job", "training"), PermissionDenied, "globex"),
        (auth.client().exchange_delegation("dg_nope.nope"), Unauthenticated, "unknown delegation"),
        (auth.client().exchange_delegation("not-a-secret"), Unauthenticated, "malformed"),
        (auth.client().exchange_delegation(""), InvalidArgument, "required"),
        (auth.client().revoke_delegation("dg_nope.nope"), Unauthenticated, "unknown delegation"),
    ]:
        with pytest.raises(error) as info:
            await call
        assert fragment in info.value.message, info.value.message
    assert not [e for e in await admin.list_audit_events("acme", 100) if e.action.startswith("delegation.")]


async def test_with_mutual_tls_only_the_delegate_service_requests_and_uses_a_delegation(
    settings: AuthSettings, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    init_certificates(certs)
    mtls = replace(settings, certs_dir=str(certs), client_auth="require")
    running = await start_auth(mtls)
    clients: list[AuthClient] = []

    def client(identity: str, token: str = "") -> AuthClient:
        extra = [cast(grpc.aio.ClientInterceptor, BearerToken(token))] if token else []
        made = AuthClient(create_channel(running.address, mtls, identity=identity, extra_interceptors=extra))
        clients.append(made)
        return made

    try:
        cli = client("cli")
        admin_token = (await cli.login("platform", "admin", running.admin_password)).access_token
        await client("cli", admin_token).create_tenant("acme")
        await client("cli", admin_token).create_user("acme", "dev", PASSWORD, ["developer"])
        dev_token = (await cli.login("acme", "dev", PASSWORD)).access_token
        # The user's own tools cannot make one for the training service: the request must come through it.
        with pytest.raises(PermissionDenied, match="training"):
            await client("cli", dev_token).create_delegation("acme", "job-1", "training")
        created = await client("training", dev_token).create_delegation("acme", "job-1", "training")
        # Only the training service may exchange it: another service, or the user with the secret, may not.
        for other in ("storage", "cli"):
            with pytest.raises(PermissionDenied, match="training"):
                await client(other).exchange_delegation(created.secret)
        token = (await client("training").exchange_delegation(created.secret)).access_token
        assert (await client("cli", token).whoami()).subject == "user:acme/dev"
        await client("training").revoke_delegation(created.secret)
    finally:
        for made in clients:
            await made.close()
        await running.server.stop(0)
