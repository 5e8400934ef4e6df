"""The scheduler's metrics through its real gRPC server (real auth, real runner processes): queue depth, admitted
jobs, allocation against capacity, admissions, preemptions and ended jobs per pool, and the cycle's time."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as pb
from services.scheduler.client import resources
from tests.scheduler.service_support import (
    GIB,
    RunningScheduler,
    runner_command,
    set_quota,
    wait_state,
    wait_terminal,
)

CPU = 1000  # millicores


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def eventually(check: object, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_queue_admissions_allocation_preemptions_and_ended_jobs(scheduler: RunningScheduler) -> None:
    pool = "default"
    before = {
        "admissions": value("aidc_scheduler_admissions_total", pool=pool),
        "preemptions": value("aidc_scheduler_preemptions_total", pool=pool),
        "cancelled": value("aidc_scheduler_jobs_finished_total", pool=pool, state="cancelled"),
        "cycles": value("aidc_scheduler_cycle_seconds_count"),
    }
    admin = scheduler.client("platform/admin")
    await set_quota(admin, "acme", 2 * CPU, cohort="lab")
    await set_quota(admin, "globex", 2 * CPU, cohort="lab")
    globex, acme = scheduler.submitter("globex/dev"), scheduler.submitter("acme/dev")
    # globex fills the 4-core node: its own 2 cores and 2 borrowed from acme's quota.
    borrowers = [
        (
            await globex.submit_job(
                runner_command(600, 0.1), resources=resources(2 * CPU, GIB), preemptible=True, grace_seconds=2
            )
        ).job
        for _ in range(2)
    ]
    for job in borrowers:
        await wait_state(globex, job.job_id, [pb.JOB_STATE_RUNNING])
    await eventually(lambda: value("aidc_scheduler_allocated", pool=pool, resource="cpu_millicores") == 4 * CPU)
    assert value("aidc_scheduler_capacity", pool=pool, resource="cpu_millicores") == 4 * CPU
    assert value("aidc_scheduler_capacity", pool=pool, resource="memory_bytes") == 8 * GIB
    assert value("aidc_scheduler_admitted_jobs", pool=pool) == 2
    assert value("aidc_scheduler_admissions_total", pool=pool) - before["admissions"] == 2

    # A job beyond anyone's quota waits: the queue shows it.
    waiting = (await globex.submit_job(runner_command(3, 0.05), resources=resources(CPU, GIB))).job
    await eventually(lambda: value("aidc_scheduler_queue_depth", pool=pool) == 1)

    # acme reclaims its quota: one of globex's jobs is preempted.
    owner = (await acme.submit_job(runner_command(600, 0.1), resources=resources(2 * CPU, GIB))).job
    await eventually(lambda: value("aidc_scheduler_preemptions_total", pool=pool) - before["preemptions"] == 1)

    for client, job in ((globex, waiting), (acme, owner), *((globex, b) for b in borrowers)):
        await client.cancel_job(job.job_id)
    for client, job in ((globex, waiting), (acme, owner), *((globex, b) for b in borrowers)):
        assert (await wait_terminal(client, job.job_id, timeout=60)).state == pb.JOB_STATE_CANCELLED
    assert value("aidc_scheduler_jobs_finished_total", pool=pool, state="cancelled") - before["cancelled"] == 4
    await eventually(lambda: value("aidc_scheduler_queue_depth", pool=pool) == 0)
    await eventually(lambda: value("aidc_scheduler_allocated", pool=pool, resource="cpu_millicores") == 0)
    assert value("aidc_scheduler_admitted_jobs", pool=pool) == 0
    assert value("aidc_scheduler_cycle_seconds_count") > before["cycles"]
