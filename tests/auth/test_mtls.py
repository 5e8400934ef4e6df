"""Mutual TLS between services: certificates from `aidc certs init`; a client without a valid certificate
cannot call a service that requires mTLS, and a mesh service's identity comes only from its certificate."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from services.auth.client import AuthClient
from services.auth.config import AuthSettings
from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
from services.mesh.certs import init_certificates, issue_certificate
from services.mesh.channels import create_channel
from services.mesh.errors import Unauthenticated, Unavailable
from services.mesh.security import secured_server
from tests.conftest import start_auth
from tests.mesh.echo import PERMISSIONS, EchoClient, Req, registration


@pytest.fixture
def mtls_settings(settings: AuthSettings, tmp_path: Path) -> AuthSettings:
    certs = tmp_path / "certs"
    init_certificates(certs)
    return replace(settings, certs_dir=str(certs), client_auth="require")


async def test_mtls_accepts_mesh_certificates_and_rejects_everything_else(
    mtls_settings: AuthSettings, tmp_path: Path
) -> None:
    running = await start_auth(mtls_settings)
    address = running.address
    try:
        # The operator's CLI certificate: TLS handshake succeeds, and a password login works over it.
        cli = AuthClient(create_channel(address, mtls_settings, identity="cli"))
        tokens = await cli.login("platform", "admin", running.admin_password)
        assert tokens.access_token
        # ...but a certificate alone makes nobody a principal unless it is a mesh service's.
        with pytest.raises(Unauthenticated):
            await cli.whoami()

        # A mesh service is identified by its certificate, with no token at all.
        storage = AuthClient(create_channel(address, mtls_settings, identity="storage"))
        me = await storage.whoami()
        assert (me.subject, me.kind) == ("service:storage", pb.PRINCIPAL_KIND_SERVICE)

        # No client certificate, a certificate from another CA, or plaintext: no connection at all.
        no_cert = AuthClient(create_channel(address, mtls_settings, identity=None), retries=0)
        other_ca = tmp_path / "other-ca"
        init_certificates(other_ca, ["storage"])
        rogue = AuthClient(
            create_channel(address, replace(mtls_settings, certs_dir=str(other_ca)), identity="storage"),
            retries=0,
        )
        plaintext = AuthClient(grpc.aio.insecure_channel(address), retries=0)
        for client in (no_cert, rogue, plaintext):
            with pytest.raises(Unavailable):
                await client.get_jwks()
            await client.close()
        await cli.close()
        await storage.close()
    finally:
        await running.server.stop(0)


async def test_services_talk_mtls_to_each_other(mtls_settings: AuthSettings) -> None:
    """A service only becomes SERVING once its mTLS channel to auth works (it fetches auth's JWKS), and the
    end user's token travels over that channel to auth's CheckPermission."""
    running = await start_auth(mtls_settings)
    issue_certificate(Path(mtls_settings.certs_dir), "echo")
    echo = secured_server("echo", mtls_settings, [registration()], PERMISSIONS, address="127.0.0.1:0")
    port = await echo.start()
    try:
        await echo.wait_ready(timeout=10)
        cli = AuthClient(create_channel(running.address, mtls_settings, identity="cli"))
        token = (await cli.login("platform", "admin", running.admin_password)).access_token
        await cli.close()
        channel = create_channel(f"127.0.0.1:{port}", mtls_settings, identity="cli")
        reply = await EchoClient(channel).unary("ReadDatasets")(
            Req(tenant="platform"), metadata=(("authorization", f"Bearer {token}"),)
        )
        assert reply.tenant.name == "read platform"
        await channel.close()
    finally:
        await echo.stop(0)
        await running.server.stop(0)
