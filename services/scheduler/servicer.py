"""SchedulerService RPCs: translation between protobuf messages and the domain (JobScheduler, Inventory), nothing
else."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpc.aio import ServicerContext
from opentelemetry import propagate

from services.gen.aidc.common.v1 import common_pb2
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as pb
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2_grpc
from services.mesh.errors import InvalidArgument
from services.mesh.identity import PLATFORM_TENANT, current_peer_service, require_principal
from services.scheduler.core import NodeState, Prices, Resources
from services.scheduler.domain.inventory import Inventory, NodeView, PoolView, QuotaView
from services.scheduler.domain.jobs import JobScheduler, Watch
from services.scheduler.domain.model import JobRecord, JobState, NodeRecord, PoolRecord, QuotaRecord
from services.scheduler.domain.requests import JobRequest, NodeChange, PoolChange

__all__ = ["SchedulerServicer", "resources_message", "resources_from_message"]

_STATE = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.SCHEDULED: pb.JOB_STATE_SCHEDULED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLING: pb.JOB_STATE_CANCELLING,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
    JobState.PREEMPTED: pb.JOB_STATE_PREEMPTED,
}
_STATE_FROM = {v: k for k, v in _STATE.items()}
_EXECUTOR = {"local": pb.EXECUTOR_KIND_LOCAL, "kubernetes": pb.EXECUTOR_KIND_KUBERNETES, "ray": pb.EXECUTOR_KIND_RAY}
_EXECUTOR_FROM = {v: k for k, v in _EXECUTOR.items()}
_NODE_STATE = {
    NodeState.READY: pb.NODE_STATE_READY,
    NodeState.DRAINING: pb.NODE_STATE_DRAINING,
    NodeState.NOT_READY: pb.NODE_STATE_NOT_READY,
}
_NODE_STATE_FROM = {v: k.name for k, v in _NODE_STATE.items()}


def _ts(ns: int) -> Timestamp | None:
    return Timestamp(seconds=ns // 10**9, nanos=ns % 10**9) if ns else None


def _duration(seconds: float) -> Duration:
    whole = math.floor(seconds)
    return Duration(seconds=whole, nanos=int(round((seconds - whole) * 1e9)))


def _seconds(value: Duration) -> float:
    return value.seconds + value.nanos / 1e9


def _money(micros: int, currency: str) -> common_pb2.Money:
    return common_pb2.Money(micros=micros, currency=currency)


def resources_message(r: Resources) -> pb.Resources:
    return pb.Resources(
        cpu_millicores=r.cpu_millicores, memory_bytes=r.memory_bytes, gpu_count=r.gpus, gpu_type=r.gpu_type
    )


def resources_from_message(message: pb.Resources) -> Resources:
    return Resources(message.cpu_millicores, message.memory_bytes, message.gpu_count, message.gpu_type)


def _prices_message(prices: Prices, currency: str) -> pb.PoolPrices:
    return pb.PoolPrices(
        cpu_core_hour=_money(prices.cpu_core_hour_micros, currency),
        memory_gib_hour=_money(prices.memory_gib_hour_micros, currency),
        gpu_hour={k: _money(v, currency) for k, v in prices.gpu_hour_micros.items()},
    )


def _prices_from_message(message: pb.PoolPrices, currency: str) -> Prices:
    for money in (message.cpu_core_hour, message.memory_gib_hour, *message.gpu_hour.values()):
        if money.currency not in ("", currency) and money.micros:
            raise InvalidArgument(f"prices must be in the platform currency {currency}, not {money.currency!r}")
    return Prices(
        message.cpu_core_hour.micros, message.memory_gib_hour.micros, {k: v.micros for k, v in message.gpu_hour.items()}
    )


def _paths(mask: object, allowed: tuple[str, ...]) -> set[str]:
    paths = set(getattr(mask, "paths", ()))
    unknown = paths - set(allowed)
    if unknown:
        raise InvalidArgument(f"update_mask: unknown field(s) {sorted(unknown)}; allowed: {list(allowed)}")
    return paths or set(allowed)


def _scope(tenant: str) -> str:
    """The request's tenant; when empty, the caller's own ("" for platform callers: every tenant)."""
    if tenant:
        return tenant
    caller = require_principal()
    return "" if caller.tenant == PLATFORM_TENANT else caller.tenant


class SchedulerServicer(scheduler_service_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, jobs: JobScheduler, inventory: Inventory, currency: str) -> None:
        self._jobs = jobs
        self._inventory = inventory
        self._currency = currency

    # -- messages ----------------------------------------------------------------------------------------------

    def _job_message(self, job: JobRecord) -> pb.Job:
        message = pb.Job(
            tenant=job.tenant,
            job_id=job.job_id,
            name=job.name,
            pool=job.pool,
            resources=resources_message(job.per_worker),
            priority=job.priority,
            preemptible=job.preemptible,
            executor=pb.ExecutorSpec(
                kind=_EXECUTOR.get(self._inventory.pools[job.pool].executor, pb.EXECUTOR_KIND_UNSPECIFIED)
                if job.pool in self._inventory.pools
                else pb.EXECUTOR_KIND_UNSPECIFIED,
                command=list(job.argv),
                env=job.env,
                secret_env={name: "" for name in job.secret_names},
                working_dir=job.working_dir,
                workers=job.workers,
                max_run_duration=_duration(job.max_run_seconds),
                max_retries=job.max_retries,
                termination_grace_period=_duration(job.grace_seconds),
            ),
            trace_carrier=job.trace_carrier,
            labels=job.labels,
            idempotency_key=job.idempotency_key,
            state=_STATE[job.state],
            state_reason=job.state_reason,
            attempt=job.attempt,
            exit_code=job.exit_code,
            queue_position=max(job.queue_position, 0),
            submitted_by=job.submitted_by,
            submit_time=_ts(job.submit_ns),
            start_time=_ts(job.start_ns),
            end_time=_ts(job.end_ns),
            run_time=_duration(job.run_ns / 1e9),
            estimated_cost=_money(job.estimated_cost_micros, self._currency),
            preemptions=job.preemptions,
            workers=job.workers,
        )
        if job.nodes:
            message.placement.CopyFrom(
                pb.Placement(pool=job.pool, nodes=list(job.nodes), executor_ref=job.executor_ref)
            )
        return message

    def _node_message(self, view: NodeView) -> pb.Node:
        node = view.node
        message = pb.Node(
            name=node.name,
            pool=node.pool,
            state=_NODE_STATE[node.state],
            capacity=resources_message(node.capacity),
            allocated=resources_message(view.allocated),
            labels=node.labels,
            last_heartbeat_time=_ts(node.heartbeat_ns),
            running_jobs=view.running_jobs,
        )
        if node.prices is not None:
            message.prices.CopyFrom(_prices_message(node.prices, self._currency))
        return message

    def _pool_message(self, view: PoolView) -> pb.Pool:
        pool = view.pool
        return pb.Pool(
            name=pool.name,
            executor=_EXECUTOR[pool.executor],
            capacity=resources_message(view.capacity),
            allocated=resources_message(view.allocated),
            gpu_types=list(view.gpu_types),
            nodes=[self._node_message(n) for n in view.nodes],
            running_jobs=view.running_jobs,
            queued_jobs=view.queued_jobs,
            max_run_duration=_duration(pool.max_run_seconds),
            prices=_prices_message(pool.prices, self._currency),
            default=pool.is_default,
        )

    def _pool_view(self, pool: PoolRecord) -> pb.Pool:
        return self._pool_message(next(v for v in self._inventory.pool_views() if v.pool.name == pool.name))

    def _node_view(self, node: NodeRecord) -> pb.Node:
        view = next(v for p in self._inventory.pool_views() for v in p.nodes if v.node.name == node.name)
        return self._node_message(view)

    @staticmethod
    def _quota_message(quota: QuotaRecord) -> pb.Quota:
        limit = quota.nominal + quota.borrowing_limit if quota.borrowing_limit is not None else Resources()
        message = pb.Quota(
            pool=quota.pool,
            max_resources=resources_message(limit),
            max_running_jobs=quota.max_running_jobs,
            max_queued_jobs=quota.max_queued_jobs,
            update_time=_ts(quota.update_ns),
            nominal=resources_message(quota.nominal),
            cohort=quota.cohort,
            weight=quota.weight,
        )
        if quota.borrowing_limit is not None:
            message.borrowing_limit.CopyFrom(resources_message(quota.borrowing_limit))
        if quota.lending_limit is not None:
            message.lending_limit.CopyFrom(resources_message(quota.lending_limit))
        return message

    def _quota_usage(self, view: QuotaView) -> pb.QuotaUsage:
        return pb.QuotaUsage(
            quota=self._quota_message(view.quota),
            allocated=resources_message(view.allocated),
            running_jobs=view.running_jobs,
            queued_jobs=view.queued_jobs,
            borrowed=resources_message(view.borrowed),
            share=view.share if math.isfinite(view.share) else 0.0,
        )

    # -- jobs --------------------------------------------------------------------------------------------------

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: ServicerContext) -> pb.SubmitJobResponse:
        caller = require_principal()
        spec = request.executor
        carrier = dict(request.trace_carrier)
        if not carrier:
            propagate.inject(carrier)  # the current trace context of this call
        job_request = JobRequest(
            tenant=request.tenant or caller.tenant,
            name=request.name,
            pool=request.pool,
            per_worker=resources_from_message(request.resources),
            workers=spec.workers or 1,
            priority=request.priority,
            preemptible=request.preemptible,
            argv=tuple(spec.command),
            env=dict(spec.env),
            secret_env=dict(spec.secret_env),
            working_dir=spec.working_dir,
            max_run_seconds=_seconds(spec.max_run_duration),
            max_retries=spec.max_retries,
            grace_seconds=_seconds(spec.termination_grace_period)
            if spec.HasField("termination_grace_period")
            else None,
            trace_carrier=carrier,
            labels=dict(request.labels),
            idempotency_key=request.idempotency_key,
            executor=_EXECUTOR_FROM.get(spec.kind, ""),
        )
        job, deduplicated = await self._jobs.submit(
            job_request,
            caller.subject,
            privileged=caller.tenant == PLATFORM_TENANT,
            # A mesh service (its verified certificate on this connection), also when it forwards an end user's
            # token: then the job is the user's, in their tenant, under their authorization, quota and budget.
            via_service=current_peer_service.get(),
        )
        return pb.SubmitJobResponse(job=self._job_message(job), deduplicated=deduplicated)

    async def GetJob(self, request: pb.GetJobRequest, context: ServicerContext) -> pb.GetJobResponse:
        job = await self._jobs.job(_scope(request.tenant), request.job_id)
        return pb.GetJobResponse(job=self._job_message(job))

    async def ListJobs(self, request: pb.ListJobsRequest, context: ServicerContext) -> pb.ListJobsResponse:
        states = frozenset(_STATE_FROM[s] for s in request.states if s in _STATE_FROM)
        page = await self._jobs.jobs(
            _scope(request.tenant),
            states,
            request.pool,
            dict(request.labels),
            request.page.page_size,
            request.page.page_token,
        )
        return pb.ListJobsResponse(
            jobs=[self._job_message(j) for j in page.items],
            page=common_pb2.PageResponse(next_page_token=page.next_token),
        )

    async def WatchJobs(
        self, request: pb.WatchJobsRequest, context: ServicerContext
    ) -> AsyncIterator[pb.WatchJobsResponse]:
        watch = Watch(_scope(request.tenant), frozenset(request.job_ids), dict(request.labels))
        async for job, previous in self._jobs.watch(watch, request.include_current):
            yield pb.WatchJobsResponse(job=self._job_message(job), previous_state=_STATE[previous])

    async def CancelJob(self, request: pb.CancelJobRequest, context: ServicerContext) -> pb.CancelJobResponse:
        job = await self._jobs.cancel(_scope(request.tenant), request.job_id, request.reason)
        return pb.CancelJobResponse(job=self._job_message(job))

    # -- quotas ------------------------------------------------------------------------------------------------

    async def SetQuota(self, request: pb.SetQuotaRequest, context: ServicerContext) -> pb.SetQuotaResponse:
        q = request.quota
        nominal = q.nominal if q.HasField("nominal") else q.max_resources
        stored = await self._inventory.set_quota(
            QuotaRecord(
                tenant=request.tenant,
                pool=q.pool or self._jobs.options.default_pool,
                nominal=resources_from_message(nominal),
                borrowing_limit=(
                    resources_from_message(q.borrowing_limit)
                    if q.HasField("borrowing_limit")
                    else (None if q.HasField("nominal") else Resources())
                ),
                lending_limit=resources_from_message(q.lending_limit) if q.HasField("lending_limit") else None,
                cohort=q.cohort,
                weight=q.weight if q.HasField("weight") else 1.0,
                max_running_jobs=q.max_running_jobs,
                max_queued_jobs=q.max_queued_jobs,
            )
        )
        return pb.SetQuotaResponse(quota=self._quota_message(stored))

    async def GetQuota(self, request: pb.GetQuotaRequest, context: ServicerContext) -> pb.GetQuotaResponse:
        views = self._inventory.quota_views(_scope(request.tenant), request.pool)
        return pb.GetQuotaResponse(quotas=[self._quota_usage(v) for v in views])

    # -- pools and nodes ---------------------------------------------------------------------------------------

    async def ListPools(self, request: pb.ListPoolsRequest, context: ServicerContext) -> pb.ListPoolsResponse:
        return pb.ListPoolsResponse(
            pools=[self._pool_message(v) for v in self._inventory.pool_views(_scope(request.tenant))]
        )

    async def CreatePool(self, request: pb.CreatePoolRequest, context: ServicerContext) -> pb.CreatePoolResponse:
        p = request.pool
        pool = await self._inventory.create_pool(
            PoolChange(
                name=p.name,
                executor=_EXECUTOR_FROM.get(p.executor, "local"),
                prices=_prices_from_message(p.prices, self._currency) if p.HasField("prices") else None,
                max_run_seconds=_seconds(p.max_run_duration) if p.HasField("max_run_duration") else None,
            )
        )
        return pb.CreatePoolResponse(pool=self._pool_view(pool))

    async def UpdatePool(self, request: pb.UpdatePoolRequest, context: ServicerContext) -> pb.UpdatePoolResponse:
        p = request.pool
        paths = _paths(request.update_mask, ("prices", "max_run_duration"))
        pool = await self._inventory.update_pool(
            PoolChange(
                name=p.name,
                prices=_prices_from_message(p.prices, self._currency) if "prices" in paths else None,
                max_run_seconds=_seconds(p.max_run_duration) if "max_run_duration" in paths else None,
            )
        )
        return pb.UpdatePoolResponse(pool=self._pool_view(pool))

    async def AddNode(self, request: pb.AddNodeRequest, context: ServicerContext) -> pb.AddNodeResponse:
        n = request.node
        node = await self._inventory.add_node(
            NodeChange(
                name=n.name,
                pool=n.pool,
                capacity=resources_from_message(n.capacity),
                labels=dict(n.labels),
                prices=_prices_from_message(n.prices, self._currency) if n.HasField("prices") else None,
                state=_NODE_STATE_FROM.get(n.state),
            )
        )
        return pb.AddNodeResponse(node=self._node_view(node))

    async def UpdateNode(self, request: pb.UpdateNodeRequest, context: ServicerContext) -> pb.UpdateNodeResponse:
        n = request.node
        paths = _paths(request.update_mask, ("capacity", "labels", "prices", "state"))
        if "state" in paths and n.state not in _NODE_STATE_FROM:
            raise InvalidArgument("state must be READY, DRAINING or NOT_READY")
        node = await self._inventory.update_node(
            NodeChange(
                name=n.name,
                capacity=resources_from_message(n.capacity) if "capacity" in paths else None,
                labels=dict(n.labels) if "labels" in paths else None,
                prices=_prices_from_message(n.prices, self._currency)
                if "prices" in paths and n.HasField("prices")
                else None,
                clear_prices="prices" in paths and not n.HasField("prices"),
                state=_NODE_STATE_FROM[n.state] if "state" in paths else None,
            )
        )
        return pb.UpdateNodeResponse(node=self._node_view(node))

    async def RemoveNode(self, request: pb.RemoveNodeRequest, context: ServicerContext) -> pb.RemoveNodeResponse:
        await self._inventory.remove_node(request.name)
        return pb.RemoveNodeResponse()
