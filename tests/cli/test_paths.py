"""The CLI is a tenant's client: against an auth service running mutual TLS (as under `aidc up`) it logs in and works
with nothing but the CA file, on the tenant endpoint; an operator holding a client certificate of the mesh may take
the mesh path instead (AIDC_CLIENT_CERT). A real auth process; the CLI in-process through typer's runner."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.mesh.certs import init_certificates
from tests.cli.conftest import AuthServer, Cli
from tests.conftest import service_env, start_service_process, stop_process


def _wait_tls_serving(address: str, ca: Path, process: object, timeout: float = 60.0) -> None:
    credentials = grpc.ssl_channel_credentials(ca.read_bytes())
    deadline = time.monotonic() + timeout
    with grpc.secure_channel(address, credentials) as channel:
        while time.monotonic() < deadline:
            assert process.poll() is None, "auth exited"  # type: ignore[attr-defined]
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING")


@pytest.fixture
def mtls_auth(tmp_path: Path) -> Iterator[tuple[AuthServer, Path]]:
    certs = tmp_path / "certs"
    init_certificates(certs)
    data_dir = tmp_path / "data"
    env = service_env(data_dir, AIDC_CERTS_DIR=str(certs))
    env["AIDC_AUTH_ADDR"] = env["AIDC_STORAGE_TENANT_ADDR"]  # a free port of its own
    env["AIDC_STORAGE_TENANT_ADDR"] = "off"
    process = start_service_process("auth", env, tmp_path / "auth.log")
    try:
        _wait_tls_serving(env["AIDC_AUTH_TENANT_ADDR"], certs / "ca.pem", process)
        bootstrap = (data_dir / "auth" / "bootstrap-admin.json").read_text()
        yield AuthServer(env["AIDC_AUTH_ADDR"], env["AIDC_AUTH_TENANT_ADDR"], data_dir, "", bootstrap), certs
    finally:
        stop_process(process)


def _cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: AuthServer, **env: str) -> Cli:
    for name in list(os.environ):
        if name.startswith(("AIDC_", "OTEL_")):
            monkeypatch.delenv(name)
    credentials = tmp_path / "laptop" / "credentials.json"
    monkeypatch.setenv("AIDC_DATA_DIR", str(tmp_path / "laptop"))
    monkeypatch.setenv("AIDC_CREDENTIALS_FILE", str(credentials))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Cli(server, credentials)


def test_the_cli_needs_only_the_ca_file(
    mtls_auth: tuple[AuthServer, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, certs = mtls_auth
    laptop = tmp_path / "ca-only"
    laptop.mkdir()
    shutil.copy(certs / "ca.pem", laptop / "ca.pem")  # all a tenant is given besides its credentials
    password = json.loads(server.bootstrap_password)["password"]
    cli = _cli(
        tmp_path, monkeypatch, server, AIDC_AUTH_TENANT_ADDR=server.tenant_address, AIDC_CA_FILE=str(laptop / "ca.pem")
    )
    cli.ok(
        "login", "--tenant", "platform", "--user", "admin", "--password-stdin", input=f"{password}\nnew passphrase 42"
    )
    assert "user:platform/admin" in cli.ok("whoami").stdout
    cli.ok("tenant", "create", "acme")
    assert "acme" in cli.ok("tenant", "list").stdout

    # Without the CA file there is no TLS to that endpoint: nothing is sent.
    monkeypatch.delenv("AIDC_CA_FILE")
    refused = cli("login", "--tenant", "platform", "--user", "admin", "--password-stdin", input="new passphrase 42")
    assert refused.exit_code == 1 and "UNAVAILABLE" in refused.output

    # An operator with the mesh's client certificate takes the mesh path.
    operator = _cli(
        tmp_path / "operator",
        monkeypatch,
        server,
        AIDC_CERTS_DIR=str(certs),
        AIDC_CLIENT_CERT="cli",
        AIDC_AUTH_ADDR=server.address,
    )
    operator.ok("login", "--tenant", "platform", "--user", "admin", "--password-stdin", input="new passphrase 42")
    assert "user:platform/admin" in operator.ok("whoami").stdout
    stored = json.loads(operator.credentials_file.read_text())
    assert stored["auth_addr"] == server.address

    # On the mesh path only auth's own certificate answers for auth: another service's (every service certificate
    # names localhost and 127.0.0.1 too) is refused before a byte of the request, the password, is sent.
    with _impostor(certs, "billing") as (address, calls):
        misled = _cli(
            tmp_path / "misled",
            monkeypatch,
            server,
            AIDC_CERTS_DIR=str(certs),
            AIDC_CLIENT_CERT="cli",
            AIDC_AUTH_ADDR=address,
        )
        refused = misled(
            "login", "--tenant", "platform", "--user", "admin", "--password-stdin", input="new passphrase 42"
        )
        assert refused.exit_code == 1 and "UNAVAILABLE" in refused.output
        assert calls == []


@contextlib.contextmanager
def _impostor(certs: Path, service: str) -> Iterator[tuple[str, list[str]]]:
    """A TLS server at a loopback address presenting ``service``'s certificate, recording each method called."""
    calls: list[str] = []

    class Record(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> None:
            calls.append(details.method)
            return None

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[Record()])
    credentials = grpc.ssl_server_credentials(
        [((certs / f"{service}-key.pem").read_bytes(), (certs / f"{service}.pem").read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}", calls
    finally:
        server.stop(None)
