"""The training service's side of the scheduler: a job's run submitted, followed and cancelled through the
scheduler's client (whose channel forwards the token of whoever the job acts as: its submitter)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from pathlib import Path

from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from services.scheduler.client import SchedulerClient, resources, state_name, worker_output
from services.training.core.scheduling import RunRequest, ScheduledRun

__all__ = ["SchedulerRuns"]


def _run(job: scheduler_pb.Job) -> ScheduledRun:
    queued = job.state == scheduler_pb.JOB_STATE_QUEUED
    return ScheduledRun(
        job_id=job.job_id,
        state=state_name(job.state),
        reason=job.state_reason,
        queue_position=job.queue_position if queued else -1,
        attempt=job.attempt,
        exit_code=job.exit_code,
        nodes=tuple(job.placement.nodes),
        preemptions=job.preemptions,
    )


class SchedulerRuns:
    """ComputeScheduler over a SchedulerClient."""

    def __init__(self, client: SchedulerClient) -> None:
        self._client = client

    async def submit(self, request: RunRequest) -> ScheduledRun:
        compute = request.compute
        response = await self._client.submit_job(
            request.argv,
            tenant=request.tenant,
            name=request.name,
            pool=compute.pool,
            resources=resources(compute.cpu_millicores, compute.memory_bytes, compute.gpu_count, compute.gpu_type),
            priority=compute.priority,
            preemptible=compute.preemptible,
            env=request.env,
            secret_env=request.secret_env,
            working_dir=str(request.working_dir),
            max_run_seconds=compute.max_run_seconds,
            trace_carrier=request.trace_carrier,
            labels=request.labels,
            idempotency_key=request.idempotency_key,
        )
        return _run(response.job)

    async def run(self, tenant: str, job_id: str) -> ScheduledRun:
        return _run(await self._client.get_job(job_id, tenant))

    async def watch(self, tenant: str, job_id: str) -> AsyncGenerator[ScheduledRun, None]:
        changes = self._client.watch_jobs(tenant, job_ids=[job_id], include_current=True)
        async with contextlib.aclosing(changes):
            async for change in changes:
                yield _run(change.job)

    async def cancel(self, tenant: str, job_id: str, reason: str) -> ScheduledRun:
        return _run(await self._client.cancel_job(job_id, tenant, reason))

    def output_file(self, working_dir: Path, job_id: str, attempt: int) -> Path:
        return worker_output(working_dir, job_id, attempt)
