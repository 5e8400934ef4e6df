"""The typed client of the scheduler service (the training service, the CLI and tests use it), plus helpers that
build its messages (resources, prices, durations) so callers need not know the wire's shapes."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask

from services.gen.aidc.common.v1 import common_pb2
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as pb
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2_grpc
from services.mesh.client import ServiceClient
from services.scheduler.executors.base import worker_output

__all__ = ["SchedulerClient", "resources", "prices", "duration", "TERMINAL_STATES", "state_name", "worker_output"]

#: Job states after which nothing changes.
TERMINAL_STATES = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})


def state_name(state: int) -> str:
    """ "queued", "running", ... for a JobState value."""
    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]


def resources(cpu_millicores: int = 0, memory_bytes: int = 0, gpus: int = 0, gpu_type: str = "") -> pb.Resources:
    return pb.Resources(cpu_millicores=cpu_millicores, memory_bytes=memory_bytes, gpu_count=gpus, gpu_type=gpu_type)


def prices(
    cpu_core_hour_micros: int,
    memory_gib_hour_micros: int = 0,
    gpu_hour_micros: Mapping[str, int] | None = None,
    currency: str = "USD",
) -> pb.PoolPrices:
    def money(micros: int) -> common_pb2.Money:
        return common_pb2.Money(micros=micros, currency=currency)

    return pb.PoolPrices(
        cpu_core_hour=money(cpu_core_hour_micros),
        memory_gib_hour=money(memory_gib_hour_micros),
        gpu_hour={k: money(v) for k, v in (gpu_hour_micros or {}).items()},
    )


def duration(seconds: float) -> Duration:
    return Duration(seconds=int(seconds), nanos=int(round((seconds - int(seconds)) * 1e9)))


class SchedulerClient(ServiceClient):
    """Typed calls to SchedulerService; errors arrive as services.mesh.errors types."""

    def __init__(self, channel: grpc.aio.Channel, **kwargs: float) -> None:
        super().__init__(channel, **kwargs)  # type: ignore[arg-type]
        self.stub = scheduler_service_pb2_grpc.SchedulerServiceStub(channel)

    # -- jobs --------------------------------------------------------------------------------------------

    async def submit_job(
        self,
        command: Sequence[str],
        *,
        tenant: str = "",
        name: str = "",
        pool: str = "",
        resources: pb.Resources | None = None,
        workers: int = 1,
        priority: int = 0,
        preemptible: bool = False,
        env: Mapping[str, str] | None = None,
        secret_env: Mapping[str, str] | None = None,
        working_dir: str = "",
        max_run_seconds: float = 0,
        max_retries: int = 0,
        grace_seconds: float | None = None,
        trace_carrier: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str = "",
    ) -> pb.SubmitJobResponse:
        spec = pb.ExecutorSpec(
            command=list(command),
            env=dict(env or {}),
            secret_env=dict(secret_env or {}),
            working_dir=working_dir,
            workers=workers,
            max_retries=max_retries,
        )
        if max_run_seconds:
            spec.max_run_duration.CopyFrom(duration(max_run_seconds))
        if grace_seconds is not None:
            spec.termination_grace_period.CopyFrom(duration(grace_seconds))
        request = pb.SubmitJobRequest(
            tenant=tenant,
            name=name,
            pool=pool,
            resources=resources,
            priority=priority,
            preemptible=preemptible,
            executor=spec,
            trace_carrier=dict(trace_carrier or {}),
            idempotency_key=idempotency_key,
            labels=dict(labels or {}),
        )
        # Safe to retry only with an idempotency key: a retry then returns the job the first call queued.
        return await self._unary(self.stub.SubmitJob, request, idempotent=bool(idempotency_key))

    async def get_job(self, job_id: str, tenant: str = "") -> pb.Job:
        request = pb.GetJobRequest(tenant=tenant, job_id=job_id)
        return (await self._unary(self.stub.GetJob, request, idempotent=True)).job

    async def list_jobs(
        self,
        tenant: str = "",
        *,
        states: Sequence[pb.JobState.ValueType] = (),
        pool: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[pb.Job], str]:
        request = pb.ListJobsRequest(
            tenant=tenant,
            states=list(states),
            pool=pool,
            labels=dict(labels or {}),
            page=common_pb2.PageRequest(page_size=page_size, page_token=page_token),
        )
        response = await self._unary(self.stub.ListJobs, request, idempotent=True)
        return list(response.jobs), response.page.next_page_token

    async def watch_jobs(
        self,
        tenant: str = "",
        *,
        job_ids: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
        include_current: bool = False,
    ) -> AsyncGenerator[pb.WatchJobsResponse, None]:
        """Job changes as they happen (no deadline: the stream never ends on its own)."""
        request = pb.WatchJobsRequest(
            tenant=tenant, job_ids=list(job_ids), labels=dict(labels or {}), include_current=include_current
        )
        async for response in self._server_stream(self.stub.WatchJobs, request):
            yield response

    async def cancel_job(self, job_id: str, tenant: str = "", reason: str = "") -> pb.Job:
        request = pb.CancelJobRequest(tenant=tenant, job_id=job_id, reason=reason)
        # Cancelling twice is harmless: the second call returns the job.
        return (await self._unary(self.stub.CancelJob, request, idempotent=True)).job

    # -- quotas ------------------------------------------------------------------------------------------

    async def set_quota(self, tenant: str, quota: pb.Quota) -> pb.Quota:
        request = pb.SetQuotaRequest(tenant=tenant, quota=quota)
        return (await self._unary(self.stub.SetQuota, request, idempotent=True)).quota

    async def get_quota(self, tenant: str = "", pool: str = "") -> list[pb.QuotaUsage]:
        request = pb.GetQuotaRequest(tenant=tenant, pool=pool)
        return list((await self._unary(self.stub.GetQuota, request, idempotent=True)).quotas)

    # -- pools and nodes ---------------------------------------------------------------------------------

    async def list_pools(self, tenant: str = "") -> list[pb.Pool]:
        request = pb.ListPoolsRequest(tenant=tenant)
        return list((await self._unary(self.stub.ListPools, request, idempotent=True)).pools)

    async def create_pool(self, pool: pb.Pool) -> pb.Pool:
        return (await self._unary(self.stub.CreatePool, pb.CreatePoolRequest(pool=pool))).pool

    async def update_pool(self, pool: pb.Pool, fields: Sequence[str] = ()) -> pb.Pool:
        request = pb.UpdatePoolRequest(pool=pool, update_mask=FieldMask(paths=list(fields)))
        return (await self._unary(self.stub.UpdatePool, request, idempotent=True)).pool

    async def add_node(self, node: pb.Node) -> pb.Node:
        return (await self._unary(self.stub.AddNode, pb.AddNodeRequest(node=node))).node

    async def update_node(self, node: pb.Node, fields: Sequence[str] = ()) -> pb.Node:
        request = pb.UpdateNodeRequest(node=node, update_mask=FieldMask(paths=list(fields)))
        return (await self._unary(self.stub.UpdateNode, request, idempotent=True)).node

    async def remove_node(self, name: str) -> None:
        await self._unary(self.stub.RemoveNode, pb.RemoveNodeRequest(name=name))
