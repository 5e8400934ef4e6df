"""Fixtures shared by the whole suite: free ports, settings on a temp data dir, a real auth server."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from services.auth.client import AuthClient
from services.auth.config import AuthSettings
from services.auth.server import build_server
from services.mesh.channels import create_channel
from services.mesh.server import MeshServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def settings(tmp_path: Path) -> AuthSettings:
    """Auth settings on a fresh data dir with cheap password hashing (tests only)."""
    return AuthSettings.from_env(
        {
            "AIDC_DATA_DIR": str(tmp_path / "data"),
            "AIDC_AUTH_ADDR": f"127.0.0.1:{free_port()}",
            "AIDC_AUTH_ARGON2_TIME_COST": "1",
            "AIDC_AUTH_ARGON2_MEMORY_KIB": "1024",
        }
    )


@dataclass
class RunningAuth:
    server: MeshServer
    settings: AuthSettings
    address: str
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


async def start_auth(settings: AuthSettings) -> RunningAuth:
    server = await build_server(settings)
    await server.start()
    await server.wait_ready()
    bootstrap = settings.bootstrap_file
    password = json.loads(bootstrap.read_text())["password"] if bootstrap.exists() else ""
    return RunningAuth(server, settings, settings.auth_addr, password)


@pytest.fixture
async def auth(settings: AuthSettings) -> AsyncIterator[RunningAuth]:
    running = await start_auth(settings)
    yield running
    await running.server.stop(0)


__all__ = ["free_port", "RunningAuth", "start_auth", "replace"]
