"""Fixtures for CLI tests: a real auth service in its own process, and the ``aidc`` app pointed at it.

The CLI runs its RPCs with ``asyncio.run`` per command, so the server can't share the test's event loop;
it runs as ``python -m services.auth``, exactly as ``aidc up`` starts it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from services.cli.main import app
from tests.conftest import (
    first_admin_login,
    free_port,
    service_env,
    start_service_process,
    stop_process,
    wait_serving,
)


@dataclass
class AuthServer:
    """An auth service process and what a test needs to know about it."""

    address: str
    #: Its tenant endpoint: where the CLI, a tenant's client, connects.
    tenant_address: str
    data_dir: Path
    #: The first-start admin's password: set by a first login at start, unless started with first_login=False.
    admin_password: str
    #: The one-time password auth wrote on first start.
    bootstrap_password: str


@pytest.fixture
def start_auth_server(tmp_path: Path) -> Iterator[Callable[..., AuthServer]]:
    """Starts an auth service process with extra ``AIDC_*`` settings; stopped at the end of the test."""
    processes = []

    def start(first_login: bool = True, **extra: str) -> AuthServer:
        data_dir = tmp_path / "data"
        address = f"127.0.0.1:{free_port()}"
        env = service_env(data_dir, AIDC_AUTH_ADDR=address, **extra)
        process = start_service_process("auth", env, tmp_path / "auth.log")
        processes.append(process)
        wait_serving(address, process=process)
        bootstrap = json.loads((data_dir / "auth" / "bootstrap-admin.json").read_text())["password"]
        password = first_admin_login(address, data_dir) if first_login else bootstrap
        return AuthServer(address, env["AIDC_AUTH_TENANT_ADDR"], data_dir, password, bootstrap)

    yield start
    for process in processes:
        stop_process(process)


@dataclass
class Cli:
    """Runs ``aidc`` commands in-process against one auth server, with a private credentials file."""

    server: AuthServer
    credentials_file: Path
    runner: CliRunner = field(default_factory=CliRunner)

    def __call__(self, *args: str, input: str | None = None) -> Result:
        return self.runner.invoke(app, list(args), input=input)

    def ok(self, *args: str, input: str | None = None) -> Result:
        """Runs a command that must succeed."""
        result = self(*args, input=input)
        assert result.exit_code == 0, f"aidc {' '.join(args)}: {result.output}"
        return result

    def login_admin(self) -> None:
        self.ok(
            "login",
            "--tenant",
            "platform",
            "--user",
            "admin",
            "--password-stdin",
            input=self.server.admin_password,
        )


def cli_for(server: AuthServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """Points the CLI's environment at ``server`` (nothing inherited from the developer's shell)."""
    for name in list(os.environ):
        if name.startswith(("AIDC_", "OTEL_")):
            monkeypatch.delenv(name)
    credentials_file = tmp_path / "cli-home" / "credentials.json"
    monkeypatch.setenv("AIDC_AUTH_ADDR", server.address)
    monkeypatch.setenv("AIDC_AUTH_TENANT_ADDR", server.tenant_address)
    monkeypatch.setenv("AIDC_DATA_DIR", str(server.data_dir))
    monkeypatch.setenv("AIDC_CREDENTIALS_FILE", str(credentials_file))
    monkeypatch.setenv("COLUMNS", "200")  # wide enough that rich never folds ids in tables
    return Cli(server, credentials_file)


@pytest.fixture
def cli(start_auth_server: Callable[..., AuthServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """The CLI against a fresh auth service with default token lifetimes."""
    return cli_for(start_auth_server(), tmp_path, monkeypatch)
