"""Fixtures of the storage tests: a real SeaweedFS, and the storage service in-process with real auth, tenants
acme and globex, and one user per role."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
import pytest
from sqlalchemy import Engine, create_engine

from services.auth.client import AuthClient
from services.cli.session import BearerToken
from services.mesh.channels import create_channel
from services.mesh.errors import AlreadyExists
from services.mesh.server import MeshServer
from services.storage.client import StorageClient
from services.storage.config import StorageSettings
from services.storage.objectstore import S3ObjectStore
from services.storage.server import build_server
from tests.conftest import (
    AuthProcess,
    RunningAuth,
    database_env,
    free_port,
    service_env,
    start_service_process,
    stop_process,
    tenant_addresses,
    wait_serving,
)
from tests.storage.seaweed import SeaweedFS

PASSWORD = "correct horse battery"
#: (tenant, user, role) created for every storage test.
USERS = (
    ("acme", "tadmin", "tenant-admin"),
    ("acme", "dev", "developer"),
    ("acme", "viewer", "viewer"),
    ("acme", "billing", "billing-viewer"),
    ("globex", "dev", "developer"),
    ("globex", "tadmin", "tenant-admin"),
)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS for the session; each test gets its own bucket in it."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


def storage_env(data_dir: Path, auth_address: str, s3: SeaweedFS, **extra: str) -> dict[str, str]:
    """Environment of a storage service on its own bucket, talking to ``auth_address`` and ``s3``."""
    env = {
        "AIDC_DATA_DIR": str(data_dir),
        "AIDC_AUTH_ADDR": auth_address,
        "AIDC_STORAGE_ADDR": f"127.0.0.1:{free_port()}",
        "AIDC_STORAGE_BUCKET": f"test-{secrets.token_hex(6)}",
        "AIDC_STORAGE_ORPHAN_GRACE_SECONDS": "0",
        "AIDC_STORAGE_S3_TIMEOUT_SECONDS": "3",
        **s3.env(),
        **tenant_addresses(),
    }
    env.update(extra)
    return env


@dataclass
class RunningStorage:
    """The storage service in this process, with a token per user ("acme/dev", ...) and raw S3 access."""

    server: MeshServer
    settings: StorageSettings
    address: str
    tokens: dict[str, str]
    objects: S3ObjectStore
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    def client(self, user: str = "acme/dev", settings: StorageSettings | None = None) -> StorageClient:
        """A client carrying ``user``'s token ("<tenant>/<name>", or "platform/admin"); its channel made with
        ``settings`` (the service's own by default)."""
        channel = create_channel(
            self.address, settings or self.settings, extra_interceptors=[bearer(self.tokens[user])]
        )
        self._channels.append(channel)
        return StorageClient(channel)

    def raw_keys(self, tenant: str = "acme") -> list[str]:
        """Every key the object store holds under the tenant's prefix."""
        return sorted(self.objects.keys(f"tenants/{tenant}/"))

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)


async def user_tokens(auth: RunningAuth) -> dict[str, str]:
    """Creates acme and globex with USERS; tokens by "<tenant>/<name>" plus "platform/admin"."""
    admin_token = (await auth.client().login("platform", "admin", auth.admin_password)).access_token
    admin = auth.client(admin_token)
    tokens = {"platform/admin": admin_token}
    for tenant in ("acme", "globex"):
        await admin.create_tenant(tenant)
    for tenant, name, role in USERS:
        await admin.create_user(tenant, name, PASSWORD, [role])
        tokens[f"{tenant}/{name}"] = (await auth.client().login(tenant, name, PASSWORD)).access_token
    return tokens


@contextlib.contextmanager
def storage_database(settings: StorageSettings) -> Iterator[Engine]:
    """An engine on the storage service's own database, for tests that must read or damage it directly."""
    engine = create_engine(settings.database_url_for("storage"))
    try:
        yield engine
    finally:
        engine.dispose()


async def start_storage(settings: StorageSettings, tokens: dict[str, str]) -> RunningStorage:
    server = await build_server(settings)
    await server.start()
    await server.wait_ready()
    return RunningStorage(server, settings, settings.storage_addr, tokens, S3ObjectStore(settings))


@pytest.fixture
async def tokens(auth: RunningAuth) -> dict[str, str]:
    return await user_tokens(auth)


@pytest.fixture
async def storage(
    auth: RunningAuth, tokens: dict[str, str], seaweed: SeaweedFS, tmp_path: Path, service_database: str
) -> AsyncIterator[RunningStorage]:
    # On the mesh's mutual TLS when auth is (tests of services that call storage as a mesh service). Then storage
    # delivers its usage: to no billing (never to the default address, which a running platform may hold), and
    # without waiting for it when stopped.
    mesh = {"AIDC_CERTS_DIR": auth.settings.certs_dir}
    if auth.settings.certs_dir:
        mesh |= {"AIDC_BILLING_ADDR": f"127.0.0.1:{free_port()}", "AIDC_SHUTDOWN_GRACE_SECONDS": "0.5"}
    env = storage_env(tmp_path / "data", auth.address, seaweed, **mesh, **database_env(service_database))
    running = await start_storage(StorageSettings.from_env(env), tokens)
    yield running
    await running.close()
    await running.server.stop(0)


@dataclass
class StorageProcess:
    """The storage service as its own OS process, next to an auth process."""

    process: subprocess.Popen[bytes]
    address: str
    env: dict[str, str]
    auth: AuthProcess
    settings: StorageSettings
    log: Path


def start_storage_process(
    auth: AuthProcess, s3: SeaweedFS, tmp_path: Path, module: str | None = None, **extra: str
) -> StorageProcess:
    """The storage service as its own process (``module``: a variant of ``services.storage``, for benchmarks)."""
    env = service_env(auth.data_dir, **storage_env(auth.data_dir, auth.address, s3, **extra))
    log = tmp_path / f"{(module or 'storage').rsplit('.', 1)[-1]}.log"
    process = start_service_process("storage", env, log, module)
    address = env["AIDC_STORAGE_ADDR"]
    try:
        wait_serving(address, process=process, certs=env.get("AIDC_CERTS_DIR"))
    except BaseException as exc:
        stop_process(process)
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"storage did not start: {exc}\n{tail}") from None
    return StorageProcess(process, address, env, auth, StorageSettings.from_env(env), log)


@pytest.fixture
def storage_process(auth_process: AuthProcess, seaweed: SeaweedFS, tmp_path: Path) -> Iterator[StorageProcess]:
    running = start_storage_process(auth_process, seaweed, tmp_path)
    try:
        yield running
    finally:
        stop_process(running.process)


async def process_client(running: StorageProcess, tenant: str, user: str) -> tuple[StorageClient, str]:
    """A client of the storage process as ``user`` (a developer of ``tenant``, created if missing)."""
    return await developer_client(running.auth, running.address, tenant, user)


async def developer_client(auth: AuthProcess, address: str, tenant: str, user: str) -> tuple[StorageClient, str]:
    """A client of the storage service at ``address`` as ``user`` (a developer of ``tenant``, created if missing)."""
    channel = create_channel(auth.address, auth.settings)
    try:
        client = AuthClient(channel)
        admin_token = (await client.login("platform", "admin", auth.admin_password)).access_token
        admin = AuthClient(create_channel(auth.address, auth.settings, extra_interceptors=[bearer(admin_token)]))
        try:
            await admin.create_tenant(tenant)
            await admin.create_user(tenant, user, PASSWORD, ["developer"])
        except AlreadyExists:
            pass
        finally:
            await admin.close()
        token = (await client.login(tenant, user, PASSWORD)).access_token
    finally:
        await channel.close(None)
    channel = create_channel(address, auth.settings, extra_interceptors=[bearer(token)])
    return StorageClient(channel), tenant


def bearer(token: str) -> grpc.aio.ClientInterceptor:
    """A client interceptor that sends ``token`` as the bearer on every call."""
    return cast(grpc.aio.ClientInterceptor, BearerToken(token))
