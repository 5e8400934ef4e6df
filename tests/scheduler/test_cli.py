"""``aidc jobs``, ``aidc quota`` and ``aidc pools`` end to end: typer's CliRunner (the real root app) against real
auth and scheduler service processes, with real runner processes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest

from services.cli.session import BearerToken
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as pb
from services.mesh.channels import create_channel
from services.scheduler.client import SchedulerClient, resources
from services.scheduler.config import SchedulerSettings
from tests.cli.conftest import AuthServer, Cli, cli_for, start_auth_server  # noqa: F401 - fixture
from tests.conftest import service_env, start_service_process, stop_process, wait_serving
from tests.scheduler.service_support import GIB, runner_command, scheduler_env

pytestmark = pytest.mark.slow


@pytest.fixture
def scheduler_cli(
    start_auth_server: Callable[..., AuthServer],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Cli, str]]:
    server = start_auth_server()
    env = service_env(server.data_dir, **scheduler_env(server.data_dir, server.address))
    process = start_service_process("scheduler", env, tmp_path / "scheduler.log")
    try:
        wait_serving(env["AIDC_SCHEDULER_ADDR"], timeout=60, process=process)
        cli = cli_for(server, tmp_path, monkeypatch)
        monkeypatch.setenv("AIDC_SCHEDULER_TENANT_ADDR", env["AIDC_SCHEDULER_TENANT_ADDR"])
        yield cli, env["AIDC_SCHEDULER_ADDR"]
    finally:
        stop_process(process)


def _submit(cli: Cli, address: str, command: list[str], cpu: int) -> pb.Job:
    token = json.loads(cli.credentials_file.read_text())["access_token"]

    async def submit() -> pb.Job:
        bearer = cast(grpc.aio.ClientInterceptor, BearerToken(token))
        client = SchedulerClient(create_channel(address, SchedulerSettings.from_env(), extra_interceptors=[bearer]))
        try:
            return (await client.submit_job(command, tenant="acme", resources=resources(cpu, GIB))).job
        finally:
            await client.close()

    return asyncio.run(submit())


def test_jobs_quota_and_pools_commands(scheduler_cli: tuple[Cli, str]) -> None:
    cli, address = scheduler_cli
    cli.login_admin()
    pools = cli.ok("pools").output
    assert "default (default)" in pools and "4 cpu, 8 GiB" in pools and "0.04 USD" in pools, pools

    assert "every tenant" not in cli.ok("quota", "set", "--tenant", "acme", "--cpu", "1", "--memory", "2Gi").output
    running = _submit(cli, address, runner_command(600, 0.1), 1000)
    waiting = _submit(cli, address, runner_command(2, 0.05), 1000)
    deadline = time.monotonic() + 60
    while "running" not in cli.ok("jobs", "show", running.job_id).output:
        assert time.monotonic() < deadline, cli.ok("jobs", "show", running.job_id).output
        time.sleep(0.2)
    listed = cli.ok("jobs", "list", "--tenant", "acme").output
    row = next(line for line in listed.splitlines() if waiting.job_id in line)
    assert "queued" in row and " 0 " in row and "quota" in row, listed
    shown = cli.ok("jobs", "show", waiting.job_id).output
    assert "queue position" in shown and "waiting for quota" in shown
    assert "1 cpu, 2 GiB" in cli.ok("quota", "show", "--tenant", "acme").output

    assert "cancelling" in cli.ok("jobs", "cancel", running.job_id, "--reason", "cli test").output
    watched = cli.ok("jobs", "watch", waiting.job_id).output  # ends when the job ends
    assert f"{waiting.job_id} running -> succeeded" in watched, watched
    assert "cancelled" in cli.ok("jobs", "show", running.job_id).output

    cli.ok("pools", "node", "add", "extra", "--pool", "default", "--cpu", "500m", "--memory", "1Gi")
    assert "draining" in cli.ok("pools", "node", "drain", "extra").output
    nodes = cli.ok("pools", "show").output
    assert "extra" in nodes and "draining" in nodes
    cli.ok("pools", "node", "remove", "extra")
    assert "extra" not in cli.ok("pools", "show").output
    refused = cli("pools", "node", "remove", "nowhere")
    assert refused.exit_code == 1 and "NOT_FOUND" in refused.output
    bad = cli("quota", "set", "--tenant", "acme", "--cpu", "lots", "--memory", "1Gi")
    assert bad.exit_code == 1 and "INVALID_ARGUMENT" in bad.output
