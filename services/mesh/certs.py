"""A local certificate authority for the mesh: one CA and one certificate per service (and the operator's
CLI), used for mutual TLS between services. ``aidc certs init`` calls ``init_certificates``."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["init_certificates", "issue_certificate", "CERT_IDENTITIES"]

#: The identities `aidc certs init` issues by default: every service, plus the operator's CLI.
CERT_IDENTITIES = ("auth", "storage", "training", "scheduler", "billing", "serving", "cli")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


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
    _write_private(certs_dir / "ca-key.pem", _key_pem(key))
    (certs_dir / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def issue_certificate(certs_dir: Path, identity: str, days: int = 365, hosts: Iterable[str] = ()) -> None:
    """Issues ``<identity>.pem``/``<identity>-key.pem`` with CN ``aidc-<identity>``, valid for server and
    client authentication, for localhost, 127.0.0.1, ::1 and ``hosts``."""
    ca_cert, ca_key = _load_ca(certs_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(f"aidc-{identity}"), x509.DNSName("localhost")]
    for host in ("127.0.0.1", "::1", *hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"aidc-{identity}")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(certs_dir / f"{identity}-key.pem", _key_pem(key))
    (certs_dir / f"{identity}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def init_certificates(
    certs_dir: Path, identities: Iterable[str] = CERT_IDENTITIES, days: int = 365, force: bool = False
) -> list[str]:
    """Creates the CA (unless present) and a certificate for each identity that lacks one; returns the
    identities issued. ``force`` starts over with a new CA."""
    certs_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(certs_dir, 0o700)
    if force or not (certs_dir / "ca.pem").exists():
        for old in certs_dir.glob("*.pem"):
            old.unlink()
        _new_ca(certs_dir, days)
    issued = []
    for identity in identities:
        if not (certs_dir / f"{identity}.pem").exists():
            issue_certificate(certs_dir, identity, days)
            issued.append(identity)
    return issued
