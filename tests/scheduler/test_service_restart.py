"""SIGKILL the scheduler with jobs queued and running (real runner processes, the scheduler its own OS process, real
billing over mutual TLS): after a restart every job ends exactly once (the running ones re-adopted, not restarted),
and billing's resource-seconds equal each allocation's held time within 1 %, none billed twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.auth.config import AuthSettings
from services.cli.session import BearerToken
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as pb
from services.mesh.certs import init_certificates
from services.mesh.channels import create_channel
from services.scheduler.client import SchedulerClient, resources
from services.scheduler.config import SchedulerSettings
from tests.billing.conftest import start_billing
from tests.conftest import service_env, start_auth, start_service_process, stop_process
from tests.scheduler.service_support import (
    GIB,
    runner_command,
    runner_events,
    scheduler_env,
    set_quota,
    user_tokens,
    wait_for,
    wait_terminal,
)
from tests.scheduler.test_service_billing import assert_billed_as_held, held_seconds

pytestmark = pytest.mark.slow

CPU = 1000


async def _wait_serving(address: str, settings: SchedulerSettings, process: subprocess.Popen[bytes]) -> None:
    """Health over the mesh's TLS, awaited (auth and billing serve from this very event loop)."""
    channel = create_channel(address, settings)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            if process.poll() is not None:
                raise RuntimeError(f"the scheduler exited with {process.returncode}")
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the scheduler at {address} is not SERVING")
    finally:
        await channel.close(None)


def _client(address: str, settings: SchedulerSettings, token: str, via: str = "cli") -> SchedulerClient:
    """A client with ``token``: on the tenant path, or ``via`` a mesh service's certificate (how a tenant's jobs are
    submitted: through the training service)."""
    bearer = cast(grpc.aio.ClientInterceptor, BearerToken(token))
    return SchedulerClient(create_channel(address, settings, identity=via, extra_interceptors=[bearer]))


async def test_after_a_sigkill_every_job_ends_exactly_once_and_is_billed_as_held(
    settings: AuthSettings, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    init_certificates(certs)
    auth = await start_auth(replace(settings, certs_dir=str(certs)))
    billing = await start_billing(auth, tmp_path / "billing-data", AIDC_CERTS_DIR=str(certs))
    billing_client = billing.client()
    tokens = await user_tokens(auth)
    env = service_env(
        tmp_path / "scheduler-data",
        **scheduler_env(
            tmp_path / "scheduler-data",
            auth.address,
            AIDC_CERTS_DIR=str(certs),
            AIDC_BILLING_ADDR=billing.address,
            AIDC_SCHEDULER_METERING_INTERVAL_SECONDS="1",
        ),
    )
    sched_settings = SchedulerSettings.from_env(env)
    address = env["AIDC_SCHEDULER_ADDR"]
    log = tmp_path / "scheduler.log"
    process = start_service_process("scheduler", env, log)
    pids: list[int] = []
    try:
        await _wait_serving(address, sched_settings, process)
        admin = _client(address, sched_settings, tokens["platform/admin"])
        client = _client(address, sched_settings, tokens["acme/dev"], via="training")
        await set_quota(admin, "acme", 3 * CPU)
        # Two jobs run (one ends while the scheduler is down, one outlives the downtime), two wait for quota.
        short = (await client.submit_job(runner_command(20, 0.1), resources=resources(CPU, GIB))).job
        long = (await client.submit_job(runner_command(60, 0.1), resources=resources(2 * CPU, 2 * GIB))).job
        queued = [
            (await client.submit_job(runner_command(10, 0.1), resources=resources(2 * CPU, GIB))).job for _ in range(2)
        ]
        for job in (short, long):
            running = await wait_for(client, job.job_id, lambda j: len(runner_events(sched_settings, j.job_id)) == 1)
            pids.append(int(running.placement.executor_ref.removeprefix("pid ")))
        for job in queued:
            assert (await client.get_job(job.job_id)).state == pb.JOB_STATE_QUEUED
        await client.close()
        await admin.close()

        process.send_signal(signal.SIGKILL)
        process.wait(10)
        await asyncio.sleep(2.5)  # the short job ends meanwhile; the long one keeps running without its parent
        assert [e["event"] for e in runner_events(sched_settings, short.job_id)] == ["start", "done"]
        assert [e["event"] for e in runner_events(sched_settings, long.job_id)] == ["start"]

        process = start_service_process("scheduler", env, log)
        await _wait_serving(address, sched_settings, process)
        client = _client(address, sched_settings, tokens["acme/dev"])
        for job in (short, long, *queued):
            done = await wait_terminal(client, job.job_id, timeout=120)
            assert done.state == pb.JOB_STATE_SUCCEEDED and done.attempt == 1, done
            events = runner_events(sched_settings, job.job_id)
            # Exactly once: one start and one end, in the first attempt (re-adopted, never relaunched).
            assert [(e["event"], e["attempt"]) for e in events] == [("start", 1), ("done", 1)]
        held = held_seconds(sched_settings)
        assert set(held) == {j.job_id for j in (short, long, *queued)}
        # The short job's allocation ended when its process did (recorded by its launcher), not at the restart.
        finished = runner_events(sched_settings, short.job_id)[-1]["time_ns"]
        short_job = await client.get_job(short.job_id)
        assert abs(short_job.end_time.ToNanoseconds() - finished) < 0.5e9
        worst = await assert_billed_as_held(billing_client, "acme", held, sched_settings)
        print(f"held vs billed after SIGKILL: {len(held)} jobs, largest relative difference {worst:.2e}")
        await client.close()
    finally:
        stop_process(process)
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await billing_client.close()
        await billing.server.stop(0)
        await auth.server.stop(0)
