"""Mutual TLS between services: certificates from `aidc certs init`; a client without a valid certificate
cannot call a service that requires mTLS, a mesh service's identity comes only from its service certificate (its
``spiffe://aidc/service/<name>`` URI, never a common name), and no client certificate can serve."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.auth.client import AuthClient
from services.auth.config import AuthSettings
from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
from services.mesh.certs import CLIENT_URI_PREFIX, init_certificates, issue_service_certificate
from services.mesh.channels import create_channel, service_channel
from services.mesh.errors import AidcError, InvalidArgument, Unauthenticated, Unavailable
from services.mesh.security import secured_server
from services.mesh.server import MeshServer
from services.platform.components import ProbeSpec
from services.platform.probes import Health, probe
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
    issue_service_certificate(Path(mtls_settings.certs_dir), "echo")
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


def legacy_certificate(certs: Path, name: str, common_name: str, uri: str | None, *, serves: bool) -> None:
    """Signs ``<name>.pem`` with the mesh CA of ``certs``: common name ``common_name``, the identity URI ``uri`` (None:
    none, as every certificate before service and client identities were separate), server and client usage and
    loopback names when ``serves`` (as every leaf had), client usage only otherwise."""
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((certs / "ca-key.pem").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)] if uri else []
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if serves:
        names += [
            x509.DNSName(common_name),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    (certs / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (certs / f"{name}-key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.mark.parametrize(
    ("case", "uri", "serves"),
    [
        # What `aidc certs issue storage` made before: CN aidc-storage, no identity URI, able to serve.
        ("legacy leaf named like a service", None, True),
        # A client certificate whose common name is a service's.
        ("client certificate with a service's common name", f"{CLIENT_URI_PREFIX}storage", False),
    ],
)
async def test_a_client_certificate_named_like_a_service_gets_no_service_identity(
    mtls_settings: AuthSettings, tmp_path: Path, case: str, uri: str | None, serves: bool
) -> None:
    running = await start_auth(mtls_settings)
    rogue = tmp_path / "rogue"
    rogue.mkdir()
    for name in ("ca.pem", "ca-key.pem"):
        shutil.copy(Path(mtls_settings.certs_dir) / name, rogue / name)
    legacy_certificate(rogue, "storage", "aidc-storage", uri, serves=serves)
    try:
        # Same CA, so the handshake succeeds; but the certificate makes nobody a principal.
        client = AuthClient(
            create_channel(running.address, replace(mtls_settings, certs_dir=str(rogue)), identity="storage")
        )
        assert await client.get_jwks()
        with pytest.raises(Unauthenticated):
            await client.whoami()
        await client.close()
        # The real service certificate of storage still is the service.
        storage = AuthClient(create_channel(running.address, mtls_settings, identity="storage"))
        assert (await storage.whoami()).subject == "service:storage"
        await storage.close()
    finally:
        await running.server.stop(0)


async def _bare_server(certs: Path, name: str) -> tuple[grpc.aio.Server, int]:
    """A gRPC server with no service at all, serving mutual TLS with certificate ``name`` of the mesh's CA."""
    server = grpc.aio.server()
    credentials = grpc.ssl_server_credentials(
        [((certs / f"{name}-key.pem").read_bytes(), (certs / f"{name}.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, port


async def test_a_client_certificate_cannot_serve(mtls_settings: AuthSettings) -> None:
    """The CLI's certificate (client authentication only, no host names) behind a server: mesh clients refuse the
    handshake; and a mesh server will not even start with it."""
    rogue, port = await _bare_server(Path(mtls_settings.certs_dir), "cli")
    try:
        for target in (f"127.0.0.1:{port}", f"localhost:{port}"):
            client = AuthClient(create_channel(target, mtls_settings, identity="storage"), retries=0)
            with pytest.raises(Unavailable):
                await client.get_jwks()
            await client.close()
    finally:
        await rogue.stop(0)
    server = MeshServer("cli", mtls_settings, [], PERMISSIONS, None, None, address="127.0.0.1:0")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="not a service certificate of 'cli'"):
        await server.start()


async def test_a_service_refuses_to_serve_with_a_certificate_from_before_identities_were_separate(
    mtls_settings: AuthSettings,
) -> None:
    legacy_certificate(Path(mtls_settings.certs_dir), "auth", "aidc-auth", None, serves=True)
    with pytest.raises(InvalidArgument, match=r"not a service certificate of 'auth'.*aidc certs init --force"):
        await start_auth(mtls_settings)


def test_init_replaces_a_certificate_directory_from_before_identities_were_separate(tmp_path: Path) -> None:
    """What `aidc up` does with an old data directory: a new CA (the old one signed client certificates that can
    serve) and every certificate issued again in the new form."""
    certs = tmp_path / "certs"
    init_certificates(certs)
    old_ca = (certs / "ca.pem").read_bytes()
    legacy_certificate(certs, "cli", "aidc-cli", None, serves=True)
    assert init_certificates(certs) == ["auth", "storage", "training", "scheduler", "billing", "serving", "cli"]
    assert (certs / "ca.pem").read_bytes() != old_ca
    cli = x509.load_pem_x509_certificate((certs / "cli.pem").read_bytes())
    assert list(cli.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    names = cli.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [n.value for n in names] == [f"{CLIENT_URI_PREFIX}cli"]
    assert init_certificates(certs) == []  # now current: kept


async def test_a_service_accepts_only_the_certificate_of_the_service_it_calls(mtls_settings: AuthSettings) -> None:
    """Every service certificate names localhost and 127.0.0.1, so checking the address alone would let one service
    (or a stolen key of it) stand in for another. A service's channel to auth accepts auth's certificate only: with
    billing's certificate behind auth's address the handshake fails, and the call never reaches it."""
    # Auth listens first, on the address reserved for it; the impostor then gets a port of its own. Started second,
    # auth once found the OS had handed that address to the impostor, and (gRPC's default SO_REUSEPORT, which mesh
    # servers now turn off) shared its port and answered the call meant for the impostor.
    running = await start_auth(mtls_settings)
    impostor, port = await _bare_server(Path(mtls_settings.certs_dir), "billing")
    try:
        at_impostor = replace(mtls_settings, auth_addr=f"127.0.0.1:{port}")
        client = AuthClient(service_channel("auth", at_impostor, identity="storage"), retries=0)
        with pytest.raises(Unavailable):
            await client.get_jwks()
        await client.close()
        # The same impostor, reached by address only (what every mesh client did): the handshake succeeds.
        unpinned = AuthClient(create_channel(f"127.0.0.1:{port}", mtls_settings, identity="storage"), retries=0)
        with pytest.raises(AidcError) as raised:
            await unpinned.get_jwks()
        assert not isinstance(raised.value, Unavailable), raised.value  # it spoke to the impostor (UNIMPLEMENTED)
        await unpinned.close()
        # The real auth, at its address: accepted.
        genuine = AuthClient(
            service_channel("auth", replace(mtls_settings, auth_addr=running.address), identity="storage")
        )
        assert await genuine.get_jwks()
        await genuine.close()
        # The supervisor's health probe of auth (what `aidc up` builds) is pinned the same way.
        probed = {
            target: (await probe(ProbeSpec("grpc", target, server_name="aidc-auth"), mtls_settings, 5.0)).health
            for target in (f"127.0.0.1:{port}", running.address)
        }
        assert probed == {f"127.0.0.1:{port}": Health.DOWN, running.address: Health.SERVING}
    finally:
        await running.server.stop(0)
        await impostor.stop(0)
