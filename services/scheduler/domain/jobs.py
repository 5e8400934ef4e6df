"""JobScheduler: the scheduler service's domain around the policy core. It keeps jobs through their lifecycle
(QUEUED -> SCHEDULED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED; PREEMPTED -> QUEUED), runs the scheduling cycle
(budget answers fetched first, the policy decides, the decisions are stored in one batch, then executed), launches
and supervises attempts through the executors, stops them (cancel, preemption, max run duration: SIGTERM, then
SIGKILL after the grace period), re-adopts them after a restart, and hands allocations to the meter.

Pure Python: no grpc. The store is blocking (run in threads through the batch writer); the executors, the meter,
billing's budget answers and the price-book sync come in through small interfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from services.mesh.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable
from services.mesh.pages import parse_offset
from services.scheduler.core import Job, Scheduler
from services.scheduler.domain.budget import BudgetGate, BudgetSource
from services.scheduler.domain.model import (
    Allocation,
    JobRecord,
    JobState,
    PoolRecord,
    QuotaRecord,
    StopKind,
)
from services.scheduler.domain.requests import PRIVILEGED_PRIORITY, JobRequest
from services.scheduler.domain.secrets import SecretSealer
from services.scheduler.domain.writer import BatchWriter
from services.scheduler.executors import EXIT_LOST, Executor, ExitStatus, LaunchRequest, Run
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.store import SchedulerStore

__all__ = ["JobScheduler", "JobOptions", "Meter", "Page", "Watch"]

log = logging.getLogger(__name__)

_WATCH_BUFFER = 10_000
_TRACE_KEYS = ("traceparent", "tracestate", "baggage")
#: The policy core's reason of a queued job no cycle has examined yet.
_UNEXAMINED = "waiting for the next scheduling cycle"


class _Queued:
    """The queued jobs by id, and by tenant: a cycle asks which tenants wait (for their budget) without a pass over
    a deep queue (a pass per cycle was most of a cycle's time with 10,000 jobs queued)."""

    def __init__(self) -> None:
        self._jobs: dict[str, JobRecord] = {}
        self._by_tenant: dict[str, dict[str, JobRecord]] = {}

    def __setitem__(self, job_id: str, job: JobRecord) -> None:
        self.pop(job_id, None)
        self._jobs[job_id] = job
        self._by_tenant.setdefault(job.tenant, {})[job_id] = job

    def pop(self, job_id: str, default: JobRecord | None = None) -> JobRecord | None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return default
        mine = self._by_tenant[job.tenant]
        del mine[job_id]
        if not mine:
            del self._by_tenant[job.tenant]
        return job

    def values(self) -> Iterable[JobRecord]:
        return self._jobs.values()

    def tenants(self) -> list[str]:
        return list(self._by_tenant)

    def of(self, tenant: str) -> Iterable[JobRecord]:
        return self._by_tenant.get(tenant, {}).values()


class Meter(Protocol):
    """The allocation meter (services.scheduler.metering.AllocationMeter)."""

    def track(self, allocation: Allocation) -> None: ...

    def latest(self, allocation: Allocation) -> Allocation: ...

    def releasing(self, allocation: Allocation, ended_ns: int) -> Allocation: ...

    async def release(self, allocation: Allocation) -> None: ...


@dataclass(frozen=True)
class JobOptions:
    jobs_dir: Path
    default_pool: str
    default_grace_seconds: float = 30.0
    cycle_interval_seconds: float = 1.0
    budget_cache_seconds: float = 5.0
    currency: str = "USD"


@dataclass(frozen=True)
class Page:
    items: list[JobRecord]
    next_token: str


@dataclass(frozen=True)
class Watch:
    """A WatchJobs filter: tenant "" means every tenant."""

    tenant: str
    job_ids: frozenset[str] = frozenset()
    labels: Mapping[str, str] | None = None

    def matches(self, job: JobRecord) -> bool:
        if self.tenant and job.tenant != self.tenant:
            return False
        if self.job_ids and job.job_id not in self.job_ids:
            return False
        return all(job.labels.get(k) == v for k, v in (self.labels or {}).items())


class _Watcher:
    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.queue: asyncio.Queue[tuple[JobRecord, JobState] | None] = asyncio.Queue(_WATCH_BUFFER)
        self.overflowed = False


def _now() -> int:
    return time.time_ns()


def _process_environment() -> dict[str, str]:
    """What every job's processes inherit: the scheduler's environment minus its own settings and credentials (a
    Ray cluster's token among them: its drivers get it from the Ray executor)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AIDC_", "AWS_", "PG", "OTEL_", "RAY_AUTH_"))}


class JobScheduler:
    """Jobs, the scheduling cycle and the runs (see the module docstring). Pools, nodes and quotas: see Inventory."""

    def __init__(
        self,
        store: SchedulerStore,
        policy: Scheduler,
        executors: Mapping[str, Executor],
        meter: Meter,
        budget: BudgetSource,
        sealer: SecretSealer,
        options: JobOptions,
        *,
        clock: Callable[[], int] = _now,
        metrics: SchedulerMetrics | None = None,
    ) -> None:
        self._metrics = metrics or SchedulerMetrics()
        self._store = store
        self.policy = policy
        self._executors = dict(executors)
        self._meter = meter
        self._sealer = sealer
        self.options = options
        self._clock = clock
        self.writer = BatchWriter(store.apply)
        self.pools: dict[str, PoolRecord] = {}
        #: (tenant, pool) -> quota; tenant "" is a pool's default quota. Kept by the inventory.
        self.quotas: dict[tuple[str, str], QuotaRecord] = {}
        self._jobs: dict[str, JobRecord] = {}  # every non-terminal job
        self._queued = _Queued()  # the QUEUED ones (the cycle looks at these, not at every job)
        self._keys: dict[tuple[str, str], str] = {}
        self._allocations: dict[tuple[str, int], Allocation] = {}
        self._runs: dict[str, Run] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._watchers: list[_Watcher] = []
        self._seq = 0
        self._wake = asyncio.Event()
        self._cycle_task: asyncio.Task[None] | None = None
        self._closing = False
        self._started = False
        self._budget = BudgetGate(budget, options.budget_cache_seconds, self._reserved, options.currency)
        self.cycles = 0
        self._id_prefix = uuid.uuid4().hex[:8]
        self._base_env = _process_environment()
        #: The GPU model of a node (the inventory's view; set by the Inventory).
        self.node_gpu_type: Callable[[str], str] = lambda _node: ""

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self, pools: Iterable[PoolRecord]) -> None:
        """Loads the queue and re-adopts what a previous instance left running (pools and nodes already loaded
        into the policy). Running processes are found by pid and start time; what is gone is treated as lost."""
        self.pools = {p.name: p for p in pools}
        self.writer.start()
        self._seq = await asyncio.to_thread(self._store.max_seq)
        for allocation in await asyncio.to_thread(self._store.open_allocations):
            self._allocations[(allocation.job_id, allocation.attempt)] = allocation
            self._meter.track(allocation)
        for job in await asyncio.to_thread(self._store.active_jobs):
            self._jobs[job.job_id] = job
            if job.idempotency_key:
                self._keys[(job.tenant, job.idempotency_key)] = job.job_id
            if job.state is JobState.QUEUED:
                self.policy.enqueue(self._policy_job(job))
                self._queued[job.job_id] = job
            else:
                self.policy.restore(self._policy_job(job), job.nodes)
                await self._resume(job)
        self._cycle_task = asyncio.create_task(self._cycle_loop(), name="scheduler-cycle")
        self._started = True
        self._wake.set()

    async def close(self) -> None:
        """Stops the cycle and stops watching runs; the runs go on (the next start adopts them)."""
        self._closing = True
        tasks = [t for t in (self._cycle_task, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for watcher in self._watchers:
            with contextlib.suppress(asyncio.QueueFull):
                watcher.queue.put_nowait(None)
        await self.writer.close()
        for executor in self._executors.values():
            await executor.close()

    # -- submission and cancellation ---------------------------------------------------------------------------

    async def submit(
        self, request: JobRequest, submitted_by: str, *, privileged: bool, via_service: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Queues a job (durably) and triggers a cycle; (job, deduplicated). ``privileged``: a platform admin or a
        mesh service acting as itself; ``via_service``: the mesh service the request came through (it may forward
        an end user's token)."""
        self._require_started()
        if not privileged and via_service is None:
            # A job is a program run on the platform's machines (the local executor runs it as the scheduler's own
            # user): only the platform's services and its admins choose what runs.
            raise PermissionDenied(
                "SubmitJob runs a program on the platform's machines: only platform admins and mesh services may "
                "call it; tenants submit fine-tunes through the training service (SubmitFineTune)"
            )
        if request.idempotency_key:
            existing = await self._by_key(request.tenant, request.idempotency_key)
            if existing is not None:
                return existing, True
        request.check()
        if request.priority > PRIVILEGED_PRIORITY and not privileged:
            raise PermissionDenied(f"priorities above {PRIVILEGED_PRIORITY} are for platform admins and services")
        pool = self._pool(request.pool or self.options.default_pool)
        if request.executor and request.executor != pool.executor:
            raise InvalidArgument(f"pool {pool.name!r} runs {pool.executor} jobs, not {request.executor}")
        if pool.executor not in self._executors:
            raise FailedPrecondition(f"pool {pool.name!r} uses the {pool.executor} executor, not available here")
        if request.driver and pool.executor != "ray":
            raise InvalidArgument(
                f"executor.driver: a driver places its workers on a Ray cluster; pool {pool.name!r} runs "
                f"{pool.executor} jobs (use a Ray pool)"
            )
        max_run = request.max_run_seconds or pool.max_run_seconds
        if max_run > pool.max_run_seconds:
            raise InvalidArgument(
                f"executor.max_run_duration {max_run:.0f} s is above pool {pool.name!r}'s limit of "
                f"{pool.max_run_seconds:.0f} s"
            )
        self._seq += 1
        # Unique without a random draw per job: this instance's random prefix, then the persisted sequence.
        job_id = f"j-{self._id_prefix}{self._seq:08x}"
        job = JobRecord(
            job_id=job_id,
            tenant=request.tenant,
            name=request.name or job_id,
            pool=pool.name,
            per_worker=request.per_worker,
            workers=request.workers,
            priority=request.priority,
            preemptible=request.preemptible,
            argv=tuple(request.argv),
            env=dict(request.env),
            secret_names=tuple(sorted(request.secret_env)),
            sealed_secrets=self._sealer.seal(job_id, request.secret_env),
            working_dir=request.working_dir,
            max_run_seconds=max_run,
            max_retries=request.max_retries,
            grace_seconds=(
                self.options.default_grace_seconds if request.grace_seconds is None else request.grace_seconds
            ),
            trace_carrier={k.lower(): v for k, v in request.trace_carrier.items() if k.lower() in _TRACE_KEYS},
            labels=dict(request.labels),
            idempotency_key=request.idempotency_key,
            driver=request.driver,
            submitted_by=submitted_by,
            submit_ns=self._clock(),
            seq=self._seq,
            state_reason="queued: waiting for the next scheduling cycle",
        )
        policy_job = self._policy_job(job)
        # InvalidJob: a gang no node set holds, absurd resources, ...; QueueFull: max_queued_jobs reached.
        self.policy.validate(policy_job)
        if job.idempotency_key:
            self._keys[(job.tenant, job.idempotency_key)] = job_id
        self._jobs[job_id] = job
        try:
            await self.writer.insert_job(job)
        except BaseException:
            self._jobs.pop(job_id, None)
            self._keys.pop((job.tenant, job.idempotency_key), None)
            raise
        self.policy.enqueue(policy_job)
        self._queued[job_id] = job
        self._publish(job, JobState.QUEUED)
        self._wake.set()
        return job, False

    async def _by_key(self, tenant: str, key: str) -> JobRecord | None:
        job_id = self._keys.get((tenant, key))
        if job_id is not None:
            live = self._jobs.get(job_id)
            if live is not None:
                await self.writer.flush()  # a concurrent first submission may still be committing
                return self._view(live)
        stored = await asyncio.to_thread(self._store.job_by_key, tenant, key)
        return self._view(stored) if stored is not None else None

    async def cancel(self, tenant: str, job_id: str, reason: str) -> JobRecord:
        """Queued: removed at once. Admitted: stopped (SIGTERM, SIGKILL after the grace period), CANCELLED when it
        exited. Terminal: returned as is."""
        self._require_started()
        job = await self.job(tenant, job_id)
        live = self._jobs.get(job_id)
        if live is None or live.terminal or live.stop is StopKind.CANCEL:
            return job
        message = f"cancelled: {reason}" if reason else "cancelled by request"
        if live.state is JobState.QUEUED:
            self.policy.dequeue(job_id)
            self._queued.pop(job_id, None)
            await self._finish(live, JobState.CANCELLED, message)
        else:
            await self._stop(live, StopKind.CANCEL, message)
        return self._view(live)

    def _require_started(self) -> None:
        if not self._started or self._closing:
            raise Unavailable("the scheduler is starting or stopping; retry shortly")

    # -- views -------------------------------------------------------------------------------------------------

    async def job(self, tenant: str, job_id: str) -> JobRecord:
        """One job ("" tenant: any); NotFound for other tenants' jobs."""
        live = self._jobs.get(job_id)
        job = live if live is not None else await asyncio.to_thread(self._store.job, job_id)
        if job is None or (tenant and job.tenant != tenant):
            raise NotFound(f"job {job_id!r} not found")
        return self._view(job)

    async def jobs(
        self,
        tenant: str,
        states: frozenset[JobState],
        pool: str,
        labels: Mapping[str, str],
        page_size: int,
        page_token: str,
    ) -> Page:
        """Newest first; tenant "" lists every tenant's."""
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        offset, limit = parse_offset(page_token), min(page_size or 50, 1000)
        await self.writer.flush()
        if labels:
            everything = await asyncio.to_thread(self._store.jobs, tenant, states, pool, 0, 1_000_000)
            matching = [j for j in everything if all(j.labels.get(k) == v for k, v in labels.items())]
            found = matching[offset : offset + limit + 1]
        else:
            found = await asyncio.to_thread(self._store.jobs, tenant, states, pool, offset, limit + 1)
        items = [self._view(self._jobs.get(j.job_id, j)) for j in found[:limit]]
        return Page(items, str(offset + limit) if len(found) > limit else "")

    def _view(self, job: JobRecord) -> JobRecord:
        """A snapshot for a caller, with its queue position while queued."""
        view = copy.copy(job)
        position = self.policy.queue_position(job.job_id) if job.state is JobState.QUEUED else None
        view.queue_position = -1 if position is None else position
        if job.state is JobState.QUEUED:
            view.state_reason = self._queued_reason(job)
        return view

    def _queued_reason(self, job: JobRecord) -> str:
        """The policy's current reason; until a cycle has looked at the job, the service's own (why it was queued
        or requeued)."""
        reason = self.policy.reason(job.job_id)
        return job.state_reason if not reason or reason == _UNEXAMINED else reason

    async def watch(self, watch: Watch, include_current: bool) -> AsyncIterator[tuple[JobRecord, JobState]]:
        """Changes of matching jobs (with the state before each), after a snapshot of the current ones if asked.
        Watching named jobs ends once all of them are terminal (NotFound for a job the tenant does not have)."""
        pending = {job_id for job_id in watch.job_ids if not (await self.job(watch.tenant, job_id)).terminal}
        watcher = _Watcher(watch)
        self._watchers.append(watcher)
        try:
            if include_current:
                for job in sorted(self._jobs.values(), key=lambda j: j.seq):
                    if watch.matches(job):
                        yield self._view(job), job.state
            while pending or not watch.job_ids:
                item = await watcher.queue.get()
                if item is None:
                    if watcher.overflowed:
                        raise FailedPrecondition("the watcher fell too far behind; watch again")
                    return
                yield item
                if item[0].terminal:
                    pending.discard(item[0].job_id)
        finally:
            self._watchers.remove(watcher)

    def _publish(self, job: JobRecord, previous: JobState) -> None:
        if not self._watchers:
            return
        snapshot: JobRecord | None = None
        for watcher in self._watchers:
            if watcher.overflowed or not watcher.watch.matches(job):
                continue
            snapshot = snapshot or self._view(job)
            try:
                watcher.queue.put_nowait((snapshot, previous))
            except asyncio.QueueFull:
                watcher.overflowed = True
                with contextlib.suppress(asyncio.QueueFull):
                    watcher.queue.get_nowait()
                    watcher.queue.put_nowait(None)

    def _publish_positions(self) -> None:
        """Queued jobs some watcher follows whose position or waiting reason changed."""
        if not self._watchers:
            return
        for job in self._queued.values():
            if not any(w.watch.matches(job) for w in self._watchers):
                continue
            position = self.policy.queue_position(job.job_id)
            position = -1 if position is None else position
            reason = self._queued_reason(job)
            if position != job.queue_position or reason != job.state_reason:
                job.queue_position, job.state_reason = position, reason
                self._publish(job, JobState.QUEUED)

    # -- the cycle ---------------------------------------------------------------------------------------------

    def trigger(self) -> None:
        """Asks for a cycle soon (coalesced: many triggers, one cycle)."""
        self._wake.set()

    async def _cycle_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.options.cycle_interval_seconds)
            self._wake.clear()
            try:
                await self.cycle()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the next cycle tries again; a bad cycle must not stop scheduling
                log.exception("scheduling cycle failed")
                await asyncio.sleep(self.options.cycle_interval_seconds)

    async def cycle(self) -> None:
        """One scheduling cycle: budget answers, the policy's decisions stored in one batch, then executed."""
        await self._budget.prefetch(self._queued.tenants(), self._head_estimate)
        began = time.perf_counter()
        result = self.policy.cycle(self._budget.check)
        self.cycles += 1
        now = self._clock()
        admitted: list[tuple[JobRecord, JobState]] = []
        preempted: list[tuple[JobRecord, JobState]] = []
        for admission in result.admitted:
            job = self._jobs[admission.job_id]
            self._queued.pop(job.job_id, None)
            previous = job.state
            job.state = JobState.SCHEDULED
            job.nodes = tuple(admission.nodes)
            job.admitted_ns = now
            job.estimated_cost_micros = admission.estimated_cost_micros
            job.state_reason = f"admitted on {', '.join(sorted(set(job.nodes)))}" + (
                " (borrowing from the cohort)" if admission.borrowing else ""
            )
            allocation = Allocation(
                job.job_id,
                job.attempt,
                job.tenant,
                job.pool,
                job.nodes,
                replace(job.per_worker, gpu_type=self._gpu_type_of(job)),
                now,
            )
            self._allocations[(job.job_id, job.attempt)] = allocation
            self.writer.insert_allocation(allocation)
            self.writer.save_job(job)
            admitted.append((job, previous))
            self._metrics.admitted(job.pool)
        for preemption in result.preempted:
            job = self._jobs[preemption.job_id]
            if job.stop is not StopKind.NONE:
                continue
            preempted.append((job, job.state))
            job.stop, job.stop_reason = StopKind.PREEMPT, preemption.reason
            job.state, job.state_reason = JobState.PREEMPTED, f"preempting: {preemption.reason}"
            job.kill_at_ns = now + int(job.grace_seconds * 1e9)
            self.writer.save_job(job)
            self._metrics.preempted(job.pool)
        for job_id, reason in result.reasons.items():
            waiting = self._jobs.get(job_id)
            if waiting is not None and waiting.state is JobState.QUEUED and reason != waiting.state_reason:
                waiting.state_reason = reason
                self.writer.save_job(waiting)
        await self.writer.flush()
        self._metrics.cycle_seconds.observe(time.perf_counter() - began)
        self._metrics.pools(self.policy, self.pools)
        for job, previous in admitted:
            self._meter.track(self._allocations[(job.job_id, job.attempt)])
            self._publish(job, previous)
            self._start_task(job, self._run(job))
        for job, previous in preempted:
            self._publish(job, previous)
            run = self._runs.get(job.job_id)
            if run is not None:
                await run.stop(job.grace_seconds)
        self._publish_positions()

    def _head_estimate(self, tenant: str) -> int:
        """The estimated cost of the tenant's next queued job (what billing is asked about)."""
        head = min(
            self._queued.of(tenant),
            key=lambda j: (-j.priority, j.seq),
        )
        pool = self.pools[head.pool]
        total = head.per_worker.scaled(head.workers)
        try:
            return pool.prices.cost_micros(total, head.max_run_seconds, self._gpu_type_of(head) or None)
        except ValueError:
            return 0

    def _reserved(self, tenant: str) -> int:
        """What the tenant's jobs holding resources may still cost: each one's estimate less what of it the meter has
        sent to billing already (billing's answer counts that as spent; counting it twice would keep a tenant with a
        long job waiting for money it has). Between metering and billing's ingest (the outbox's delivery lag) the
        part just metered is counted by neither."""
        reserved = 0
        for allocation in self._allocations.values():
            job = self._jobs.get(allocation.job_id)
            if allocation.tenant != tenant or job is None or not job.holding:
                continue
            metered_ns = self._meter.latest(allocation).metered_until_ns - allocation.admitted_ns
            pool = self.pools.get(job.pool)
            run_seconds = job.max_run_seconds or (pool.max_run_seconds if pool is not None else 0)
            metered = 0.0
            if metered_ns > 0 and run_seconds > 0:  # the estimate is linear in the time held
                metered = job.estimated_cost_micros * min(metered_ns / 1e9 / run_seconds, 1.0)
            reserved += max(math.ceil(job.estimated_cost_micros - metered), 0)
        return reserved

    def _gpu_type_of(self, job: JobRecord) -> str:
        if not job.per_worker.gpus:
            return ""
        if job.per_worker.gpu_type or not job.nodes:
            return job.per_worker.gpu_type
        return self.node_gpu_type(job.nodes[0])

    # -- runs --------------------------------------------------------------------------------------------------

    def _launch_request(self, job: JobRecord) -> LaunchRequest:
        env = dict(self._base_env)
        env.update(job.env)
        env.update(self._sealer.unseal(job.job_id, job.sealed_secrets))
        env.update({k.upper(): v for k, v in job.trace_carrier.items()})
        return LaunchRequest(
            job_id=job.job_id,
            attempt=job.attempt,
            argv=job.argv,
            env=env,
            job_dir=self.options.jobs_dir / job.job_id,
            nodes=job.nodes,
            cwd=Path(job.working_dir) if job.working_dir else None,
            per_worker=job.per_worker,
            driver=job.driver,
        )

    def _executor(self, job: JobRecord) -> Executor:
        return self._executors[self.pools[job.pool].executor]

    async def _run(self, job: JobRecord) -> None:
        """Launches an admitted attempt and supervises it to its end."""
        if job.stop is not StopKind.NONE:  # cancelled (or preempted) between admission and launch
            await self._conclude(job, ExitStatus(0, "never started"))
            return
        try:
            run = await self._executor(job).launch(self._launch_request(job))
        except OSError as exc:
            await self._conclude(job, ExitStatus(127, f"could not start: {exc}"))
            return
        await self._supervise(job, run)

    async def _resume(self, job: JobRecord) -> None:
        """After a restart: the attempt's processes adopted (or launched, if it never started), or lost. What ended
        while the scheduler was down is concluded here, before metering resumes, so its allocation is billed up to
        when it really ended."""
        try:
            run = await self._executor(job).adopt(self._launch_request(job), job.worker_refs)
        except Exception:
            log.exception("job %s: re-adopting its run failed", job.job_id)
            run = None
        if run is None:
            if job.state is JobState.SCHEDULED and job.stop is StopKind.NONE:
                self._start_task(job, self._run(job))
            else:
                await self._conclude(job, ExitStatus(EXIT_LOST, "no trace of its processes after a restart"))
            return
        if len(run.workers) < job.workers:  # a gang partly started when the scheduler stopped
            await run.stop(0)
            await run.wait()
            await self._conclude(job, ExitStatus(EXIT_LOST, "its gang was only partly started"))
            return
        if run.done():
            await self._supervise(job, run)
        else:
            self._start_task(job, self._supervise(job, run))

    def _start_task(self, job: JobRecord, work: Coroutine[Any, Any, None]) -> None:
        self._tasks[job.job_id] = asyncio.create_task(self._guarded(job, work), name=f"job-{job.job_id}")

    async def _guarded(self, job: JobRecord, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: supervising its run failed", job.job_id)
            if not job.terminal:
                await self._conclude(job, ExitStatus(EXIT_LOST, "internal error of the scheduler"))

    async def _supervise(self, job: JobRecord, run: Run) -> None:
        self._runs[job.job_id] = run
        if job.state is JobState.SCHEDULED:
            previous = job.state
            job.state = JobState.RUNNING
            job.running_since_ns = job.running_since_ns or self._clock()
            job.start_ns = job.start_ns or job.running_since_ns
            job.state_reason = f"running (attempt {job.attempt})"
            job.executor_ref = run.ref
            job.worker_refs = tuple(run.workers)
            await self.writer.save_job(job)
            self._publish(job, previous)
        if job.stop is not StopKind.NONE:  # a stop decided before the launch, or before a restart
            await run.stop(max(job.kill_at_ns - self._clock(), 0) / 1e9)
        deadline = job.running_since_ns + int(job.max_run_seconds * 1e9)
        waiting = asyncio.ensure_future(run.wait())
        try:
            while True:
                remaining = max(deadline - self._clock(), 0) / 1e9
                done, _ = await asyncio.wait({waiting}, timeout=remaining if job.stop is StopKind.NONE else None)
                if done:
                    break
                await self._stop(job, StopKind.TIMEOUT, f"exceeded its max run duration of {job.max_run_seconds:.0f} s")
        finally:
            if not waiting.done():
                waiting.cancel()
        await self._conclude(job, waiting.result())

    async def _stop(self, job: JobRecord, kind: StopKind, reason: str) -> None:
        """Starts stopping an admitted job's attempt: SIGTERM now, SIGKILL after its grace period."""
        previous = job.state
        job.stop, job.stop_reason = kind, reason
        job.kill_at_ns = self._clock() + int(job.grace_seconds * 1e9)
        job.state = JobState.CANCELLING if kind is StopKind.CANCEL else job.state
        job.state_reason = f"stopping: {reason}" if kind is not StopKind.CANCEL else reason
        await self.writer.save_job(job)
        self._publish(job, previous)
        run = self._runs.get(job.job_id)
        if run is not None:
            await run.stop(job.grace_seconds)

    async def _conclude(self, job: JobRecord, status: ExitStatus) -> None:
        """An attempt ended: its allocation is released (once), and the job moves on."""
        if job.terminal or job.job_id not in self._jobs:
            return
        now = self._clock()
        self._runs.pop(job.job_id, None)
        key = (job.job_id, job.attempt)
        allocation = self._allocations.pop(key, None)
        released = now
        if status.ended_ns:
            released = max(min(status.ended_ns, now), job.admitted_ns)
        if allocation is not None:
            # Held at least as long as it was metered: a window a tick metered as complete (the exit not noticed
            # yet, and the resources not reassignable meanwhile) is not metered again with other content; and no
            # tick meters past the release while it is being stored. No await until the policy has released it and
            # the next state is set: a cycle in between would see the ended attempt still holding its resources.
            allocation = self._meter.releasing(allocation, released)
            released = allocation.released_ns
        if job.running_since_ns:
            job.run_ns += max(released - job.running_since_ns, 0)
        self.policy.release(job.job_id)
        job.exit_code = status.code if status.code != EXIT_LOST else 0
        previous = job.state
        stop, stop_reason = job.stop, job.stop_reason
        detail = status.reason or f"exit code {status.code}"
        if stop is StopKind.CANCEL:
            target, reason = JobState.CANCELLED, stop_reason
        elif stop is StopKind.PREEMPT:
            job.preemptions += 1
            target, reason = JobState.QUEUED, f"requeued after preemption ({stop_reason})"
        elif stop is StopKind.TIMEOUT:
            target, reason = JobState.FAILED, f"{stop_reason} ({detail})"
        elif stop is StopKind.LOST or (status.disrupted and stop is StopKind.NONE):
            # The platform lost the node, not the job: requeued like a preemption (it resumes from its checkpoint).
            target = JobState.QUEUED
            reason = f"requeued: attempt {job.attempt} was lost with its node ({stop_reason or detail})"
        elif status.code == 0:
            target, reason = JobState.SUCCEEDED, "exit code 0"
        else:
            job.failures += 1
            what = "lost" if status.lost else "failed"
            if job.failures <= job.max_retries:
                target = JobState.QUEUED
                reason = f"attempt {job.attempt} {what} ({detail}); retry {job.failures} of {job.max_retries}"
            else:
                target, reason = JobState.FAILED, f"{what}: {detail}"
        if allocation is not None:
            self.writer.save_allocation(allocation)
        if target is JobState.QUEUED:
            job.attempt += 1
            job.nodes, job.worker_refs, job.executor_ref = (), (), ""
            job.admitted_ns = job.running_since_ns = job.kill_at_ns = 0
            job.stop, job.stop_reason, job.estimated_cost_micros = StopKind.NONE, "", 0
            job.state, job.state_reason = JobState.QUEUED, reason
            await self.writer.save_job(job)
            self.policy.enqueue(self._policy_job(job))
            self._queued[job.job_id] = job
            self._publish(job, previous)
        else:
            await self._finish(job, target, reason, end_ns=released)
        if allocation is not None:
            await self._meter.release(allocation)
        self._wake.set()

    async def _finish(self, job: JobRecord, state: JobState, reason: str, end_ns: int = 0) -> None:
        previous = job.state
        job.state, job.state_reason = state, reason
        self._metrics.finished(job.pool, state.value)
        job.end_ns = end_ns or self._clock()
        job.kill_at_ns = 0
        await self.writer.save_job(job)
        self._jobs.pop(job.job_id, None)
        self._tasks.pop(job.job_id, None)
        self._publish(job, previous)

    # -- conversions -------------------------------------------------------------------------------------------

    def _policy_job(self, job: JobRecord) -> Job:
        return Job(
            job_id=job.job_id,
            tenant=job.tenant,
            pool=job.pool,
            per_worker=job.per_worker,
            workers=job.workers,
            priority=job.priority,
            preemptible=job.preemptible,
            seq=job.seq,
            max_run_seconds=job.max_run_seconds,
        )

    def _pool(self, name: str) -> PoolRecord:
        pool = self.pools.get(name)
        if pool is None:
            raise InvalidArgument(f"unknown pool {name!r}")
        return pool

    # -- what the inventory needs ------------------------------------------------------------------------------

    def has_executor(self, kind: str) -> bool:
        return kind in self._executors

    def active_jobs(self) -> Sequence[JobRecord]:
        return list(self._jobs.values())

    async def lose_jobs(self, job_ids: Iterable[str], reason: str) -> None:
        """Jobs whose node went NOT_READY: their processes are killed at once and the attempt ends as lost (the
        job is requeued under its retry policy)."""
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is None or job.terminal:
                continue
            log.warning("job %s: %s", job_id, reason)
            if job.stop is StopKind.NONE:
                job.stop, job.stop_reason = StopKind.LOST, reason
                job.kill_at_ns = self._clock()
                await self.writer.save_job(job)
            run = self._runs.get(job_id)
            if run is not None:
                await run.stop(0)
