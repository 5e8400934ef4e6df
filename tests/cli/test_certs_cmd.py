"""``aidc certs``: service certificates and client certificates are different things, and the CLI will not issue a
client certificate under a mesh service's name (typer's CliRunner; the certificates are parsed and checked)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from services.cli.main import app
from services.mesh.config import SERVICE_NAMES


def _aidc(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _names_and_usages(path: Path) -> tuple[list[str], list[x509.ObjectIdentifier]]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    return [str(n.value) for n in names], list(usages)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    target = tmp_path / "certs"
    code, output = _aidc("certs", "init", "--dir", str(target))
    assert code == 0, output
    assert f"issued {', '.join([*SERVICE_NAMES, 'cli'])}" in output
    return target


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["issue", "auth"], "'auth' is a mesh service: client certificates may not be named like one"),
        (["issue", "billing"], "'billing' is a mesh service"),
        (["issue", "../evil"], "certificate name '../evil'"),
        (["issue", "ca"], "certificate name 'ca'"),
        (["service", "acme"], "'acme' is not a mesh service"),
    ],
)
def test_refused_certificates_change_nothing(certs: Path, args: list[str], message: str) -> None:
    before = {p.name: p.read_bytes() for p in certs.iterdir()}
    code, output = _aidc("certs", *args, "--dir", str(certs))
    assert code == 1 and f"error: INVALID_ARGUMENT: {message}" in output
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == before


def test_a_client_certificate_authenticates_clients_only(certs: Path) -> None:
    code, output = _aidc("certs", "issue", "acme-laptop", "--dir", str(certs))
    assert code == 0, output
    names, usages = _names_and_usages(certs / "acme-laptop.pem")
    assert names == ["spiffe://aidc/client/acme-laptop"]  # no host name: nothing to serve as
    assert usages == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _names_and_usages(certs / "cli.pem") == (["spiffe://aidc/client/cli"], [ExtendedKeyUsageOID.CLIENT_AUTH])


def test_a_service_certificate_is_reissued_with_its_cluster_names(certs: Path) -> None:
    code, output = _aidc("certs", "service", "auth", "--host", "auth.aidc.svc", "--dir", str(certs))
    assert code == 0, output
    names, usages = _names_and_usages(certs / "auth.pem")
    assert names == ["spiffe://aidc/service/auth", "aidc-auth", "localhost", "127.0.0.1", "::1", "auth.aidc.svc"]
    assert usages == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
