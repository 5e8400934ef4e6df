"""A local certificate authority for the mesh, with two kinds of leaf certificate that cannot be mistaken for each
other: a service's (URI name ``spiffe://aidc/service/<service>``, server and client authentication, loopback and its
host names) and a client's (``spiffe://aidc/client/<name>``, client authentication only, no host names, so it can
never serve). The mesh grants a service identity only for the service URI, never for a common name.
``aidc certs init`` calls ``init_certificates``."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.mesh.config import SERVICE_NAMES
from services.mesh.errors import InvalidArgument
from services.mesh.files import private_dir, write_private

__all__ = [
    "CLIENT_IDENTITIES",
    "SERVICE_URI_PREFIX",
    "CLIENT_URI_PREFIX",
    "init_certificates",
    "issue_service_certificate",
    "issue_client_certificate",
    "outdated_certificates",
    "check_service_certificate",
]

log = logging.getLogger(__name__)

#: The client certificates `aidc certs init` issues besides one per service: the operator's CLI.
CLIENT_IDENTITIES = ("cli",)
SERVICE_URI_PREFIX = "spiffe://aidc/service/"
CLIENT_URI_PREFIX = "spiffe://aidc/client/"

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_RESERVED = {"ca"}


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_ca(certs_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((certs_dir / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((certs_dir / "ca-key.pem").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def _new_ca(certs_dir: Path, days: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aidc local CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_private(certs_dir / "ca-key.pem", _key_pem(key))
    (certs_dir / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _check_name(name: str) -> None:
    if not _NAME.match(name) or name in _RESERVED:
        raise InvalidArgument(
            f"certificate name {name!r}: 1-63 lowercase letters, digits and '-', starting with a letter or digit, "
            "and not 'ca'"
        )


def _issue(
    certs_dir: Path,
    name: str,
    uri: str,
    usages: list[x509.ObjectIdentifier],
    dns: list[str],
    days: int,
) -> None:
    ca_cert, ca_key = _load_ca(certs_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    for host in dns:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"aidc-{name}")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(certs_dir / f"{name}-key.pem", _key_pem(key))
    (certs_dir / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def issue_service_certificate(certs_dir: Path, service: str, days: int = 365, hosts: Iterable[str] = ()) -> None:
    """Issues ``<service>.pem``/``<service>-key.pem``: URI ``spiffe://aidc/service/<service>``, server and client
    authentication, valid for aidc-<service>, localhost, 127.0.0.1, ::1 and ``hosts``."""
    _check_name(service)
    dns = [f"aidc-{service}", "localhost", "127.0.0.1", "::1", *hosts]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    _issue(certs_dir, service, SERVICE_URI_PREFIX + service, usages, dns, days)


def issue_client_certificate(certs_dir: Path, name: str, days: int = 365) -> None:
    """Issues ``<name>.pem``/``<name>-key.pem``: URI ``spiffe://aidc/client/<name>``, client authentication only and
    no host name, so no client can serve as part of the mesh. Mesh service names are refused."""
    _check_name(name)
    if name in SERVICE_NAMES:
        raise InvalidArgument(f"{name!r} is a mesh service: client certificates may not be named like one")
    _issue(certs_dir, name, CLIENT_URI_PREFIX + name, [ExtendedKeyUsageOID.CLIENT_AUTH], [], days)


def _identity_uri(cert: x509.Certificate) -> str | None:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else None


def _usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return set()


def _is_current(path: Path, uri: str, usages: set[x509.ObjectIdentifier]) -> bool:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return _identity_uri(cert) == uri and _usages(cert) == usages


def outdated_certificates(
    certs_dir: Path, services: Iterable[str] = SERVICE_NAMES, clients: Iterable[str] = CLIENT_IDENTITIES
) -> list[str]:
    """Certificates in ``certs_dir`` from before service and client identities were separate (no identity URI, or a
    client certificate that could serve)."""
    both = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    expected = [(s, SERVICE_URI_PREFIX + s, both) for s in services]
    expected += [(c, CLIENT_URI_PREFIX + c, {ExtendedKeyUsageOID.CLIENT_AUTH}) for c in clients]
    return [
        name
        for name, uri, usages in expected
        if (certs_dir / f"{name}.pem").exists() and not _is_current(certs_dir / f"{name}.pem", uri, usages)
    ]


def init_certificates(
    certs_dir: Path,
    services: Iterable[str] = SERVICE_NAMES,
    clients: Iterable[str] = CLIENT_IDENTITIES,
    days: int = 365,
    force: bool = False,
) -> list[str]:
    """Creates the CA (unless present) and a certificate for each service and client that lacks one; returns the
    names issued. ``force`` starts over with a new CA.

    A directory holding certificates from before service and client identities were separate also starts over with
    a new CA: its old CA signed client certificates that can serve, and only a new CA stops trusting them.
    """
    services, clients = list(services), list(clients)
    private_dir(certs_dir)
    has_ca = (certs_dir / "ca.pem").exists()
    outdated = outdated_certificates(certs_dir, services, clients) if has_ca and not force else []
    if outdated:
        log.warning(
            "certificates in %s predate separate service and client identities (%s): replacing the CA and every "
            "certificate; client certificates issued from the old CA (`aidc certs issue`) must be issued again",
            certs_dir,
            ", ".join(outdated),
        )
    if force or not has_ca or outdated:
        for old in certs_dir.glob("*.pem"):
            old.unlink()
        _new_ca(certs_dir, days)
    issued = []
    for service in services:
        if not (certs_dir / f"{service}.pem").exists():
            issue_service_certificate(certs_dir, service, days)
            issued.append(service)
    for client in clients:
        if not (certs_dir / f"{client}.pem").exists():
            issue_client_certificate(certs_dir, client, days)
            issued.append(client)
    return issued


def check_service_certificate(pem: bytes, service: str, path: Path) -> None:
    """InvalidArgument unless ``pem`` (read from ``path``) is the service certificate of ``service``: what a mesh
    server must present."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise InvalidArgument(f"{path} is not a PEM certificate") from None
    if _identity_uri(cert) != SERVICE_URI_PREFIX + service or ExtendedKeyUsageOID.SERVER_AUTH not in _usages(cert):
        raise InvalidArgument(
            f"{path} is not a service certificate of {service!r} (no {SERVICE_URI_PREFIX}{service} name or no "
            "server authentication): certificates from before service and client identities were separate must be "
            "replaced, e.g. with `aidc certs init --force` (`aidc up` replaces its own)"
        )
