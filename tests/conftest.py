"""Fixtures shared by the whole suite: free ports, settings on a temp data dir, a real auth server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.auth.client import AuthClient
from services.auth.config import AuthSettings
from services.auth.server import build_server
from services.gen.aidc.auth.v1 import auth_service_pb2 as auth_pb
from services.gen.aidc.auth.v1 import auth_service_pb2_grpc
from services.mesh.certs import init_certificates
from services.mesh.channels import client_credentials, create_channel
from services.mesh.config import SERVICE_NAMES
from services.mesh.errors import Unauthenticated
from services.mesh.server import MeshServer

ROOT = Path(__file__).resolve().parent.parent
#: The password the tests' first login gives the first-start admin (its one-time password expires at first use).
ADMIN_PASSWORD = "the platform admin's own passphrase"


_HANDED_OUT: set[int] = set()
#: The platform's default ports (mesh 5005x, tenant 5004x, metrics 5015x, Ray 50160, ...): a test's settings leave
#: most services at their defaults, so a random port equal to one of them (the kernel hands out ports up to 60999)
#: put a tenant listener on its own service's default mesh port, refused at start.
_DEFAULTS = range(50000, 50300)


def free_port() -> int:
    """A port free now, never handed out before in this process, and none of the platform's defaults: the kernel may
    give the same free port to two binds in a row, and two settings of one service on one port (e.g. its mesh and
    tenant listeners) are refused."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT and port not in _DEFAULTS:
            _HANDED_OUT.add(port)
            return port


@pytest.fixture(scope="session")
def mesh_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One certificate directory for the session (a CA, every service's certificate, the CLI's): for tests whose
    services talk mutual TLS, as the mesh does (e.g. a mesh service submitting a job for a user)."""
    certs = tmp_path_factory.mktemp("mesh-certs")
    init_certificates(certs)
    return certs


def tenant_addresses() -> dict[str, str]:
    """Every service's tenant listener on a free port of its own (AIDC_<SVC>_TENANT_ADDR): a test's services never
    bind the fixed default tenant ports, which another session's servers may hold (a service would fail to start)."""
    return {  # free_port: never a port handed out before in this process (a mesh listener's, say)
        f"AIDC_{name.upper()}_TENANT_ADDR": f"127.0.0.1:{free_port()}" for name in SERVICE_NAMES
    }


@pytest.fixture
def service_database() -> str:
    """AIDC_DATABASE_URL of the services a test starts through the suites' fixtures (auth, storage, scheduler,
    training, serving): "" puts each on its SQLite file. A test module overriding this fixture runs them on another
    database: the PostgreSQL variants of the suites (tests/<svc>/test_postgres.py, with tests/postgres.py's
    ``postgres_services_url``) run chosen tests of the suite again that way."""
    return ""


def database_env(url: str) -> dict[str, str]:
    """The AIDC_DATABASE_URL setting for ``url`` (none for "")."""
    return {"AIDC_DATABASE_URL": url} if url else {}


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest, service_database: str) -> AuthSettings:
    """Auth settings on a fresh data dir with cheap password hashing (tests only); a test marked
    ``@pytest.mark.auth_env(AIDC_X="...")`` adds variables (e.g. a short access-token lifetime)."""
    marker = request.node.get_closest_marker("auth_env")
    return AuthSettings.from_env(
        {
            "AIDC_DATA_DIR": str(tmp_path / "data"),
            "AIDC_AUTH_ADDR": f"127.0.0.1:{free_port()}",
            "AIDC_AUTH_ARGON2_TIME_COST": "1",
            "AIDC_AUTH_ARGON2_MEMORY_KIB": "1024",
            **tenant_addresses(),
            **database_env(service_database),
            **(marker.kwargs if marker is not None else {}),
        }
    )


@dataclass
class RunningAuth:
    server: MeshServer
    settings: AuthSettings
    address: str
    #: ADMIN_PASSWORD once the first login set it; the one-time password while it is unused ("" if unknown).
    admin_password: str

    def client(self, token: str | None = None) -> AuthClient:
        channel = create_channel(self.address, self.settings)
        client = AuthClient(channel)
        if token:
            client.channel = channel
            client.stub = _with_token(client.stub, token)
        return client


class _TokenStub:
    """Adds a bearer token to every call of a generated stub."""

    def __init__(self, stub: object, token: str) -> None:
        self._stub = stub
        self._token = token

    def __getattr__(self, name: str) -> object:
        method = getattr(self._stub, name)

        def call(request: object, **kwargs: object) -> object:
            metadata = tuple(kwargs.pop("metadata", None) or ()) + (("authorization", f"Bearer {self._token}"),)
            return method(request, metadata=metadata, **kwargs)

        return call


def _with_token(stub: object, token: str) -> object:
    return _TokenStub(stub, token)


async def start_auth(settings: AuthSettings, *, first_login: bool = True) -> RunningAuth:
    """Auth in this process. With ``first_login`` the first-start admin logs in once, setting ADMIN_PASSWORD (as
    `aidc up` does with a password of its own); without it, ``admin_password`` is the unused one-time password."""
    server = await build_server(settings)
    await server.start()
    await server.wait_ready()
    bootstrap = settings.bootstrap_file
    password = json.loads(bootstrap.read_text())["password"] if bootstrap.exists() else ""
    if password and first_login:
        client = AuthClient(create_channel(settings.auth_addr, settings))
        try:
            await client.login("platform", "admin", password, new_password=ADMIN_PASSWORD)
        except Unauthenticated:
            pass  # an earlier start on this data directory did it
        finally:
            await client.close()
        password = ADMIN_PASSWORD
    return RunningAuth(server, settings, settings.auth_addr, password)


def _blocking_channel(address: str, certs: str | Path | None) -> grpc.Channel:
    """A blocking channel to a service process: plaintext, or with ``certs`` TLS presenting the CLI's certificate."""
    if not certs:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, client_credentials(Path(certs), "cli"))


def first_admin_login(address: str, data_dir: Path, certs: str | Path | None = None) -> str:
    """For an auth process: the first-start admin's first login sets ADMIN_PASSWORD; returns it."""
    password = json.loads((data_dir / "auth" / "bootstrap-admin.json").read_text())["password"]
    with _blocking_channel(address, certs) as channel:
        request = auth_pb.LoginRequest(tenant="platform", name="admin", password=password, new_password=ADMIN_PASSWORD)
        auth_service_pb2_grpc.AuthServiceStub(channel).Login(request, timeout=30)
    return ADMIN_PASSWORD


@pytest.fixture
async def auth(settings: AuthSettings) -> AsyncIterator[RunningAuth]:
    running = await start_auth(settings)
    yield running
    await running.server.stop(0)


@dataclass
class AuthProcess:
    """The auth service running as its own OS process."""

    process: subprocess.Popen[bytes]
    address: str
    data_dir: Path
    env: dict[str, str]
    admin_password: str
    settings: AuthSettings


def wait_serving(
    address: str,
    timeout: float = 30.0,
    process: subprocess.Popen[bytes] | None = None,
    certs: str | Path | None = None,
) -> None:
    """Blocks until the gRPC health service at ``address`` reports SERVING (over the mesh's TLS with ``certs``)."""
    deadline = time.monotonic() + timeout
    with _blocking_channel(address, certs) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process exited with {process.returncode}")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING after {timeout}s")


def service_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a service subprocess: this venv, a private data dir, cheap password hashing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIDC_", "OTEL_"))}
    env.update(
        AIDC_DATA_DIR=str(data_dir),
        AIDC_AUTH_ARGON2_TIME_COST="1",
        AIDC_AUTH_ARGON2_MEMORY_KIB="1024",
        PYTHONPATH=str(ROOT),
        **tenant_addresses(),
    )
    env.update(extra)
    return env


def start_service_process(
    service: str, env: dict[str, str], log: Path, module: str | None = None
) -> subprocess.Popen[bytes]:
    """``python -m services.<service>`` (or ``module``, a variant of it) with ``env``, output to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module or f"services.{service}"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_auth_process(tmp_path: Path, **extra: str) -> AuthProcess:
    """The auth service as its own OS process, data under ``tmp_path``, with ``extra`` settings (e.g. the mesh's
    AIDC_CERTS_DIR); its first-start admin logged in once. The caller stops it (stop_process)."""
    data_dir = tmp_path / "data"
    address = f"127.0.0.1:{free_port()}"
    env = service_env(data_dir, AIDC_AUTH_ADDR=address, **extra)
    process = start_service_process("auth", env, tmp_path / "auth.log")
    try:
        certs = extra.get("AIDC_CERTS_DIR")
        wait_serving(address, process=process, certs=certs)
        password = first_admin_login(address, data_dir, certs)
    except BaseException:
        stop_process(process)
        raise
    return AuthProcess(process, address, data_dir, env, password, AuthSettings.from_env(env))


@pytest.fixture
def auth_process(tmp_path: Path) -> Iterator[AuthProcess]:
    running = start_auth_process(tmp_path)
    try:
        yield running
    finally:
        stop_process(running.process)


@pytest.fixture(autouse=True)
def _hermetic_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's AIDC_*/OTEL_* variables or the repository's .aidc data directory."""
    for name in list(os.environ):
        if name.startswith(("AIDC_", "OTEL_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AIDC_DATA_DIR", str(tmp_path / "default-data"))


# -- under CI nothing skips ------------------------------------------------------------------------------------------

#: CI runs every test: a part it cannot find (kubectl, Triton, PostgreSQL, promtool, ...) is a failure there, not a
#: skip that would let a broken feature pass unseen. Developers' machines may still skip what they have not installed.
_EVERY_TEST_RUNS = os.environ.get("CI") == "true"


def _skip_as_failure(report: pytest.TestReport | pytest.CollectReport) -> None:
    if _EVERY_TEST_RUNS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _skip_as_failure(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _skip_as_failure(outcome.get_result())  # type: ignore[attr-defined]
