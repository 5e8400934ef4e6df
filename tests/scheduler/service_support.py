"""The scheduler service under test: in-process on a real port with the real auth service (tests/conftest.py),
optionally real billing over mutual TLS, users per role in acme and globex, and jobs that run tests/scheduler/
runner.py as real processes."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc

from services.cli.session import BearerToken
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as pb
from services.mesh.channels import create_channel
from services.mesh.server import MeshServer
from services.scheduler.client import TERMINAL_STATES, SchedulerClient, state_name
from services.scheduler.config import SchedulerSettings
from services.scheduler.server import build_server
from tests.conftest import RunningAuth, free_port, tenant_addresses

RUNNER = Path(__file__).with_name("runner.py")
PASSWORD = "correct horse battery"
GIB = 2**30
#: (tenant, user, role) created for the scheduler tests.
USERS = (
    ("acme", "dev", "developer"),
    ("acme", "viewer", "viewer"),
    ("globex", "dev", "developer"),
    ("initech", "dev", "developer"),
)


def scheduler_env(data_dir: Path, auth_address: str, **extra: str) -> dict[str, str]:
    """A scheduler on its own port with a 4-core, 8 GiB local node, quick cycles and a short default grace."""
    env = {
        "AIDC_DATA_DIR": str(data_dir),
        "AIDC_AUTH_ADDR": auth_address,
        "AIDC_SCHEDULER_ADDR": f"127.0.0.1:{free_port()}",
        "AIDC_BILLING_ADDR": f"127.0.0.1:{free_port()}",
        "AIDC_SCHEDULER_LOCAL_CPU_MILLICORES": "4000",
        "AIDC_SCHEDULER_LOCAL_MEMORY_BYTES": str(8 * GIB),
        "AIDC_SCHEDULER_CYCLE_INTERVAL_SECONDS": "0.2",
        "AIDC_SCHEDULER_DEFAULT_GRACE_SECONDS": "5",
        "AIDC_SCHEDULER_POLL_SECONDS": "0.1",
        "AIDC_SCHEDULER_BUDGET_CACHE_SECONDS": "0.5",
        **tenant_addresses(),
    }
    env.update(extra)
    return env


async def user_tokens(auth: RunningAuth) -> dict[str, str]:
    """Tenants acme, globex and initech with USERS; tokens by "<tenant>/<name>" plus "platform/admin"."""
    admin_token = (await auth.client().login("platform", "admin", auth.admin_password)).access_token
    admin = auth.client(admin_token)
    tokens = {"platform/admin": admin_token}
    for tenant in sorted({t for t, _, _ in USERS}):
        await admin.create_tenant(tenant)
    for tenant, name, role in USERS:
        await admin.create_user(tenant, name, PASSWORD, [role])
        tokens[f"{tenant}/{name}"] = (await auth.client().login(tenant, name, PASSWORD)).access_token
    return tokens


@dataclass
class RunningScheduler:
    server: MeshServer
    settings: SchedulerSettings
    address: str
    tokens: dict[str, str]
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    def client(self, user: str = "acme/dev", *, via: str | None = None) -> SchedulerClient:
        """A client carrying ``user``'s token ("<tenant>/<name>", or "platform/admin"): on the tenant path (the CLI's
        certificate), or ``via`` a mesh service (its certificate, as when that service calls for the user)."""
        bearer = BearerToken(self.tokens[user])
        channel = create_channel(
            self.address,
            self.settings,
            identity=via or "cli",
            extra_interceptors=[cast(grpc.aio.ClientInterceptor, bearer)],
        )
        self._channels.append(channel)
        # The server shares this test's event loop on a shared machine: a call's deadline here is no latency check
        # (bench_scheduler_rpc measures that), and 10 s ran out once in a fresh-clone run beside three CPU-heavy
        # processes (GetJob of a job in memory, DEADLINE_EXCEEDED).
        return SchedulerClient(channel, timeout_seconds=60.0)

    def submitter(self, user: str = "acme/dev") -> SchedulerClient:
        """``user``'s client through the training service, the way a tenant's jobs reach the scheduler."""
        return self.client(user, via="training")

    async def stop(self) -> None:
        for channel in self._channels:
            await channel.close(None)
        await self.server.stop(0)


async def start_scheduler(settings: SchedulerSettings, tokens: dict[str, str]) -> RunningScheduler:
    server = await build_server(settings)
    await server.start()
    await server.wait_ready(60)
    return RunningScheduler(server, settings, settings.scheduler_addr, tokens)


def runner_command(steps: int = 10, step_seconds: float = 0.1, *extra: str) -> list[str]:
    return [sys.executable, str(RUNNER), "--steps", str(steps), "--step-seconds", str(step_seconds), *extra]


def job_dir(settings: SchedulerSettings, job_id: str) -> Path:
    return settings.jobs_dir / job_id


def runner_events(settings: SchedulerSettings, job_id: str, worker: int = 0) -> list[dict[str, Any]]:
    path = job_dir(settings, job_id) / f"events-{worker}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def wait_for(
    client: SchedulerClient,
    job_id: str,
    predicate: Callable[[pb.Job], bool],
    *,
    tenant: str = "",
    timeout: float = 60.0,
    what: str = "",
) -> pb.Job:
    """Polls the job until ``predicate`` holds (generous timeout: the machine is shared)."""
    deadline = time.monotonic() + timeout
    job = await client.get_job(job_id, tenant)
    while not predicate(job):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"job {job_id} never became {what or 'as expected'}: {state_name(job.state)} ({job.state_reason})"
            )
        await asyncio.sleep(0.1)
        job = await client.get_job(job_id, tenant)
    return job


async def wait_state(
    client: SchedulerClient, job_id: str, states: Sequence[int], *, tenant: str = "", timeout: float = 60.0
) -> pb.Job:
    return await wait_for(
        client,
        job_id,
        lambda j: j.state in states,
        tenant=tenant,
        timeout=timeout,
        what="/".join(state_name(s) for s in states),
    )


async def wait_terminal(client: SchedulerClient, job_id: str, *, tenant: str = "", timeout: float = 60.0) -> pb.Job:
    return await wait_state(client, job_id, sorted(TERMINAL_STATES), tenant=tenant, timeout=timeout)


async def set_quota(
    admin: SchedulerClient,
    tenant: str,
    cpu_millicores: int,
    *,
    memory_bytes: int = 64 * GIB,
    cohort: str = "",
    borrowing_cpu: int | None = None,
    pool: str = "default",
) -> pb.Quota:
    """A quota of ``cpu_millicores`` (and plenty of memory); in a cohort, borrowing up to ``borrowing_cpu`` more
    (None: unlimited)."""
    quota = pb.Quota(
        pool=pool, nominal=pb.Resources(cpu_millicores=cpu_millicores, memory_bytes=memory_bytes), cohort=cohort
    )
    if cohort and borrowing_cpu is not None:
        quota.borrowing_limit.CopyFrom(pb.Resources(cpu_millicores=borrowing_cpu, memory_bytes=memory_bytes))
    return await admin.set_quota(tenant, quota)
