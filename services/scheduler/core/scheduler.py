"""The Scheduler: pools, nodes, quotas and jobs in memory, and the cycle that admits, places and preempts.

The service owns everything around it: it persists, calls cycle() when something changed (or periodically, for
budgets), stops preempted jobs and calls release() when they are gone, requeues what it wants requeued."""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import replace

from services.scheduler.core.cycle import run_cycle
from services.scheduler.core.errors import (
    DuplicateJob,
    InvalidConfig,
    InvalidJob,
    InvalidQuota,
    QueueFull,
    UnknownNode,
)
from services.scheduler.core.fairshare import dominant_share, drf_fair_shares
from services.scheduler.core.model import (
    DEFAULT_TENANT,
    MAX_PRIORITY,
    MIN_PRIORITY,
    BudgetCheck,
    CycleResult,
    Job,
    Node,
    NodeState,
    Pool,
    Quota,
)
from services.scheduler.core.placement import NodeSlot, workers_fitting
from services.scheduler.core.quota import Limits, TenantQueue, limits_of
from services.scheduler.core.resources import RESOURCE_NAMES, Resources, format_amount
from services.scheduler.core.state import JobRecord, PoolState, queue_key

__all__ = ["Scheduler", "MAX_WORKERS", "DEFAULT_LOOKAHEAD"]

#: The most workers one gang may ask for.
MAX_WORKERS = 4096
#: Refused jobs a tenant's scan looks past in one cycle before it stops.
DEFAULT_LOOKAHEAD = 16
_NEW_JOB_REASON = "waiting for the next scheduling cycle"


class Scheduler:
    """The policy core: every method is synchronous, does no I/O and reads no clock."""

    def __init__(self, *, lookahead: int = DEFAULT_LOOKAHEAD) -> None:
        if lookahead < 1:
            raise ValueError("lookahead must be >= 1")
        self._lookahead = lookahead
        self._pools: dict[str, PoolState] = {}
        self._nodes: dict[str, NodeSlot] = {}
        self._jobs: dict[str, JobRecord] = {}

    # -- pools and nodes ------------------------------------------------------------------------------------------

    def upsert_pool(self, pool: Pool) -> None:
        """Adds a pool or changes its prices, run limit or executor (nodes without their own prices follow)."""
        if not pool.name:
            raise InvalidConfig("pool name is empty")
        pool.prices.check(f"pool {pool.name}")
        if not (math.isfinite(pool.max_run_seconds) and pool.max_run_seconds > 0):
            raise InvalidConfig(f"pool {pool.name}: max run duration must be a positive number of seconds")
        state = self._pools.get(pool.name)
        if state is None:
            self._pools[pool.name] = PoolState(pool)
            return
        for slot in state.slots.values():
            if slot.node.prices is None and slot.cap[2]:
                _gpu_price(slot.node, pool)
        state.pool = pool
        for slot in state.slots.values():
            slot.configure(slot.node, slot.node.prices or pool.prices)
        state.nodes_changed()

    def upsert_node(self, node: Node) -> list[str]:
        """Adds or changes a node. Returns the admitted jobs lost when it is (now) NOT_READY, like set_node_state."""
        state = self._pools.get(node.pool)
        if state is None:
            raise InvalidConfig(f"node {node.name}: unknown pool {node.pool!r}")
        if not node.name:
            raise InvalidConfig("node name is empty")
        if node.capacity.any_negative():
            raise InvalidConfig(f"node {node.name}: capacity must not be negative")
        if node.prices is not None:
            node.prices.check(f"node {node.name}")
        if node.capacity.gpus:
            _gpu_price(node, state.pool)
        slot = self._nodes.get(node.name)
        if slot is not None and slot.node.pool != node.pool:
            if slot.jobs or any(slot.reserved):
                raise InvalidConfig(f"node {node.name} runs jobs of pool {slot.node.pool}: drain it first")
            old = self._pools[slot.node.pool]
            del old.slots[node.name]
            old.nodes_changed()
            slot = None
        prices = node.prices or state.pool.prices
        if slot is None:
            slot = NodeSlot(node, prices)
            self._nodes[node.name] = slot
            state.slots[node.name] = slot
        else:
            slot.configure(node, prices)
        state.nodes_changed()
        return self._lose(state, slot) if node.state is NodeState.NOT_READY else []

    def set_node_state(self, name: str, node_state: NodeState) -> list[str]:
        """READY, DRAINING (keeps its jobs, takes no new ones) or NOT_READY: then the admitted jobs that ran on it
        are released here (all their workers' resources return) and returned, for the service to requeue."""
        slot = self._nodes.get(name)
        if slot is None:
            raise UnknownNode(f"unknown node {name!r}")
        return self.upsert_node(replace(slot.node, state=node_state))

    def remove_node(self, name: str) -> None:
        """Forgets a node that holds nothing (UnknownNode if there is none; InvalidConfig while a job runs on it or
        a preemptor keeps room there: drain it, or set it NOT_READY, first)."""
        slot = self._nodes.get(name)
        if slot is None:
            raise UnknownNode(f"unknown node {name!r}")
        if slot.jobs or any(slot.reserved):
            raise InvalidConfig(f"node {name} still holds jobs: drain it or set it NOT_READY first")
        state = self._pools[slot.node.pool]
        del state.slots[name]
        del self._nodes[name]
        state.nodes_changed()

    def _lose(self, state: PoolState, slot: NodeSlot) -> list[str]:
        lost = sorted(slot.jobs)
        for job_id in lost:
            self.release(job_id)
        for rec in state.waiting.values():
            if any(s is slot for s, _ in rec.reservation):
                state.drop_reservation(rec)  # it plans again once its victims have stopped
        return lost

    # -- quotas ---------------------------------------------------------------------------------------------------

    def set_quota(self, quota: Quota) -> None:
        """Sets a tenant's quota in a pool (tenant DEFAULT_TENANT: the pool's default, for every tenant without its
        own). InvalidQuota, changing nothing, when a tenant holds more than it would allow (resources, running or
        queued jobs) or its cohort would lend less than its members borrow now."""
        state = self._pools.get(quota.pool)
        if state is None:
            raise InvalidConfig(f"quota: unknown pool {quota.pool!r}")
        _check_quota_shape(quota)
        is_default = quota.tenant == DEFAULT_TENANT
        if is_default:
            targets = [tq for tq in state.tenants.values() if tq.from_default]
        else:
            existing = state.tenants.get(quota.tenant)
            targets = [existing] if existing is not None else []
        limits = limits_of(quota)
        for tq in targets:
            _check_holds(tq, limits)
        _check_cohorts(state, targets, quota)
        if is_default:
            state.default_quota = quota
        else:
            targets = [state.tenant(quota.tenant)]
        for tq in targets:
            state.assign(tq, quota, from_default=is_default)
        state.touch()

    def quota(self, tenant: str, pool: str) -> Quota | None:
        """The quota that applies to ``tenant`` in ``pool`` (its own or the pool's default), None if none."""
        state = self._pool(pool)
        tq = state.tenants.get(tenant)
        return tq.quota if tq is not None else state.default_quota

    # -- jobs -----------------------------------------------------------------------------------------------------

    def validate(self, job: Job) -> None:
        """InvalidJob when the job can never run as asked; QueueFull when its tenant's queue in the pool is full.
        Changes nothing."""
        state = self._check_job(job)
        tq = state.tenants.get(job.tenant)
        limits = tq.limits if tq is not None else limits_of(state.default_quota)
        queued = len(tq.queue) if tq is not None else 0
        if limits.max_queued and queued >= limits.max_queued:
            raise QueueFull(f"tenant {job.tenant} has {queued}/{limits.max_queued} jobs queued in pool {job.pool}")

    def enqueue(self, job: Job) -> None:
        """Queues a job: a new one (after validate()) or a preempted or lost one again (same id, no queue limit)."""
        if job.job_id in self._jobs:
            raise DuplicateJob(f"job {job.job_id} is already queued or running")
        state = self._check_job(job)
        rec = _record(job, state.tenant(job.tenant))
        rec.reason = _NEW_JOB_REASON
        insort(rec.tq.queue, rec.key)
        state.records[job.job_id] = rec
        self._jobs[job.job_id] = rec
        state.dirty = True  # a new job changes no victim search: no new generation

    def dequeue(self, job_id: str) -> bool:
        """Removes a queued job (cancelled); False when it is not queued. Victims it already chose still stop."""
        rec = self._jobs.get(job_id)
        if rec is None or rec.admitted:
            return False
        state = self._pools[rec.job.pool]
        state.unqueue(rec)
        if state.waiting.pop(job_id, None) is not None:
            state.drop_reservation(rec)
        del state.records[job_id]
        del self._jobs[job_id]
        state.dirty = True
        return True

    def release(self, job_id: str) -> bool:
        """An admitted job ended or stopped (after a preemption, once its process is gone): its resources return.
        False when it is not admitted."""
        rec = self._jobs.get(job_id)
        if rec is None or not rec.admitted:
            return False
        state = self._pools[rec.job.pool]
        state.unadmit(rec)
        if rec.victim_of:
            preemptor = self._jobs.get(rec.victim_of)
            if preemptor is not None:
                preemptor.waiting_for.discard(job_id)
        self._forget(state, rec)
        return True

    def restore(self, job: Job, nodes: Sequence[str]) -> None:
        """Re-adopts a job that was running before a restart on ``nodes`` (one per worker): accounting only, even
        when it overruns a quota or a node that shrank meanwhile (it holds them for real)."""
        if job.job_id in self._jobs:
            raise DuplicateJob(f"job {job.job_id} is already queued or running")
        state = self._check_job(job)
        if len(nodes) != job.workers:
            raise InvalidJob(f"job {job.job_id}: {len(nodes)} nodes for {job.workers} workers")
        counts: dict[str, int] = {}
        for name in nodes:
            if name not in state.slots:
                raise InvalidJob(f"job {job.job_id}: no node {name!r} in pool {job.pool}")
            counts[name] = counts.get(name, 0) + 1
        rec = _record(job, state.tenant(job.tenant))
        state.records[job.job_id] = rec
        self._jobs[job.job_id] = rec
        state.admit(rec, [(state.slots[name], n) for name, n in counts.items()])

    def cycle(self, budget: BudgetCheck) -> CycleResult:
        """Admits what fits (quota, capacity, budget) in fair-share order and chooses victims for what may preempt.
        Pools where nothing changed since their last cycle are skipped (unless a budget refused a job there)."""
        result = CycleResult()
        for state in self._pools.values():
            if state.dirty:
                run_cycle(state, budget, result, self._lookahead)
        return result

    def _forget(self, state: PoolState, rec: JobRecord) -> None:
        del state.records[rec.job_id]
        del self._jobs[rec.job_id]
        state.touch()

    def _check_job(self, job: Job) -> PoolState:
        if not job.job_id:
            raise InvalidJob("job_id is empty")
        if not job.tenant:
            raise InvalidJob(f"job {job.job_id}: tenant is empty")
        state = self._pools.get(job.pool)
        if state is None:
            raise InvalidJob(f"job {job.job_id}: unknown pool {job.pool!r}")
        r = job.per_worker
        what = f"job {job.job_id}"
        if r.any_negative():
            raise InvalidJob(f"{what}: resources must not be negative")
        if r.is_zero():
            raise InvalidJob(f"{what}: requests no resources")
        if r.gpu_type and not r.gpus:
            raise InvalidJob(f"{what}: a GPU type without GPUs")
        if not 1 <= job.workers <= MAX_WORKERS:
            raise InvalidJob(f"{what}: workers must be between 1 and {MAX_WORKERS}")
        if not MIN_PRIORITY <= job.priority <= MAX_PRIORITY:
            raise InvalidJob(f"{what}: priority must be between {MIN_PRIORITY} and {MAX_PRIORITY}")
        limit = state.pool.max_run_seconds
        if not (math.isfinite(job.max_run_seconds) and 0 <= job.max_run_seconds <= limit):
            raise InvalidJob(f"{what}: max run duration must be between 0 (the pool's) and the pool's {limit:g} s")
        q = r.as_tuple()
        matching = [slot for slot in state.slots.values() if slot.matches(r)]
        if r.gpu_type and not matching:
            raise InvalidJob(f"{what}: no node of pool {job.pool} has GPUs of type {r.gpu_type}")
        # Nodes of any state count: a NOT_READY node may come back, but nothing bigger will appear by itself.
        room = sum(workers_fitting(q, slot.cap) for slot in matching)
        if not room:
            raise InvalidJob(f"{what}: no node of pool {job.pool} can hold {r.describe()}")
        if room < job.workers:
            raise InvalidJob(
                f"{what}: a gang of {job.workers} workers ({r.describe()} each) is bigger than pool {job.pool} "
                f"can ever hold ({room})"
            )
        return state

    def _pool(self, name: str) -> PoolState:
        state = self._pools.get(name)
        if state is None:
            raise InvalidConfig(f"unknown pool {name!r}")
        return state

    # -- views ----------------------------------------------------------------------------------------------------

    def job(self, job_id: str) -> Job | None:
        rec = self._jobs.get(job_id)
        return rec.job if rec is not None else None

    def is_admitted(self, job_id: str) -> bool:
        rec = self._jobs.get(job_id)
        return rec is not None and rec.admitted

    def placement(self, job_id: str) -> tuple[str, ...]:
        """The nodes of an admitted job, one per worker; () otherwise."""
        rec = self._jobs.get(job_id)
        if rec is None:
            return ()
        return tuple(slot.name for slot, n in rec.placement for _ in range(n))

    def preempted_by(self, job_id: str) -> str:
        """The preemptor an admitted job is stopping for, "" if none."""
        rec = self._jobs.get(job_id)
        return rec.victim_of if rec is not None else ""

    def queue_position(self, job_id: str) -> int | None:
        """0 = next among its tenant's queued jobs in its pool; None when not queued. (Across tenants the order
        depends on each admission's fair share, so a position there would be a guess.)"""
        rec = self._jobs.get(job_id)
        if rec is None or rec.admitted:
            return None
        return bisect_left(rec.tq.queue, rec.key)

    def reason(self, job_id: str) -> str:
        """Why a queued job waits ("" when it is not queued)."""
        rec = self._jobs.get(job_id)
        if rec is None or rec.admitted:
            return ""
        state = self._pools[rec.job.pool]
        end = state.scan_end.get(rec.job.tenant)
        if job_id in state.waiting or end is None:
            return rec.reason
        last, tail = end
        if last is not None and rec.key <= last:
            return rec.reason
        if tail is not None:
            return tail
        ahead = bisect_left(rec.tq.queue, rec.key)
        return (
            f"waiting behind {ahead} earlier or higher-priority jobs of tenant {rec.job.tenant} in pool {rec.job.pool}"
        )

    def queued_count(self, pool: str | None = None) -> int:
        return sum(len(tq.queue) for state in self._states(pool) for tq in state.tenants.values())

    def admitted_count(self, pool: str | None = None) -> int:
        return sum(tq.running for state in self._states(pool) for tq in state.tenants.values())

    def admitted_jobs(self, pool: str | None = None) -> list[str]:
        return [job_id for state in self._states(pool) for tq in state.tenants.values() for job_id in tq.admitted]

    def queued_jobs(self, pool: str | None = None) -> list[str]:
        return [key[2] for state in self._states(pool) for tq in state.tenants.values() for key in tq.queue]

    def tenants(self, pool: str) -> list[str]:
        return list(self._pool(pool).tenants)

    def pools(self) -> list[Pool]:
        return [state.pool for state in self._pools.values()]

    def nodes(self, pool: str | None = None) -> list[Node]:
        return [slot.node for state in self._states(pool) for slot in state.slots.values()]

    def usage(self, tenant: str, pool: str) -> Resources:
        """What the tenant's admitted jobs hold in the pool (victims included until released)."""
        tq = self._pool(pool).tenants.get(tenant)
        return tq.admitted_usage() if tq is not None else Resources()

    def allocated(self, pool: str) -> Resources:
        """What admitted jobs hold on the pool's nodes."""
        return sum((Resources.of(slot.used) for slot in self._pool(pool).slots.values()), Resources())

    def node_allocated(self, name: str) -> Resources:
        slot = self._nodes.get(name)
        if slot is None:
            raise UnknownNode(f"unknown node {name!r}")
        return Resources.of(slot.used)

    def capacity(self, pool: str) -> Resources:
        """The capacity of the pool's READY nodes."""
        return sum((Resources.of(slot.cap) for slot in self._pool(pool).slots.values() if slot.ready), Resources())

    def shares(self, pool: str) -> dict[str, float]:
        """Each tenant's fair-sharing share (the dominant share of what it borrows in its cohort, over its weight):
        the value admission order and the preemption strategies compare."""
        return {name: tq.share() for name, tq in self._pool(pool).tenants.items()}

    def dominant_shares(self, pool: str) -> dict[str, float]:
        """Each tenant's admitted usage as a dominant share of the pool's READY capacity."""
        capacity = self.capacity(pool).as_tuple()
        return {
            name: dominant_share(tq.admitted_usage().as_tuple(), capacity)
            for name, tq in self._pool(pool).tenants.items()
        }

    def fair_shares(self, pool: str) -> dict[str, float]:
        """Each tenant's DRF entitlement as a dominant share of the pool's READY capacity, capped at its demand
        (what it runs plus what it queues): idle tenants get none. O(queued jobs): for reports, not for cycles."""
        state = self._pool(pool)
        demands: dict[str, tuple[int, int, int]] = {}
        weights: dict[str, float] = {}
        for name, tq in state.tenants.items():
            demand = list(tq.admitted_usage().as_tuple())
            for key in tq.queue:
                total = state.records[key[2]].total
                for r in range(3):
                    demand[r] += total[r]
            demands[name] = (demand[0], demand[1], demand[2])
            weights[name] = tq.limits.weight
        return drf_fair_shares(self.capacity(pool).as_tuple(), demands, weights)

    def _states(self, pool: str | None) -> list[PoolState]:
        return list(self._pools.values()) if pool is None else [self._pool(pool)]


def _record(job: Job, tq: TenantQueue) -> JobRecord:
    per_worker = job.per_worker.as_tuple()
    n = job.workers
    return JobRecord(job, tq, queue_key(job), per_worker, (per_worker[0] * n, per_worker[1] * n, per_worker[2] * n))


def _gpu_price(node: Node, pool: Pool) -> int:
    try:
        return (node.prices or pool.prices).gpu_hour(node.capacity.gpu_type)
    except InvalidConfig as exc:
        raise InvalidConfig(f"node {node.name}: {exc}") from None


def _check_quota_shape(quota: Quota) -> None:
    what = f"quota of {quota.tenant or 'the default tenant'} in pool {quota.pool}"
    limits = [quota.nominal, quota.borrowing_limit, quota.lending_limit]
    if any(r is not None and r.any_negative() for r in limits):
        raise InvalidConfig(f"{what}: quantities must not be negative")
    if not quota.cohort and (quota.borrowing_limit is not None or quota.lending_limit is not None):
        raise InvalidConfig(f"{what}: borrowing and lending limits need a cohort")
    if quota.lending_limit is not None and not quota.lending_limit.fits_in(quota.nominal):
        raise InvalidConfig(f"{what}: the lending limit exceeds the nominal quota")
    if not (math.isfinite(quota.weight) and quota.weight >= 0):
        raise InvalidConfig(f"{what}: weight must be a number >= 0")
    if quota.max_running_jobs < 0 or quota.max_queued_jobs < 0:
        raise InvalidConfig(f"{what}: job limits must not be negative")


def _check_holds(tq: TenantQueue, limits: Limits) -> None:
    held = tq.admitted_usage().as_tuple()
    where = f"tenant {tq.tenant} in pool {tq.pool}"
    for r in range(3):
        if held[r] > limits.cap[r]:
            raise InvalidQuota(
                f"{where} holds {format_amount(r, held[r])}, more than the new quota allows "
                f"({format_amount(r, limits.cap[r])} of {RESOURCE_NAMES[r]}); lower it once jobs end"
            )
    if limits.max_running and tq.running > limits.max_running:
        raise InvalidQuota(f"{where} runs {tq.running} jobs, more than the new limit of {limits.max_running}")
    if limits.max_queued and len(tq.queue) > limits.max_queued:
        raise InvalidQuota(f"{where} has {len(tq.queue)} jobs queued, more than the new limit of {limits.max_queued}")


def _check_cohorts(state: PoolState, targets: list[TenantQueue], quota: Quota) -> None:
    """Refuses a change that would leave a cohort lending less than its members borrow now (or more short than it
    already is, after a restore overran it)."""
    changed = {id(tq) for tq in targets}
    new_limits = limits_of(quota)
    names = {tq.cohort.name for tq in targets if tq.cohort is not None} | ({quota.cohort} - {""})
    for name in names:
        before = [(tq, tq.limits) for tq in state.tenants.values() if tq.cohort is not None and tq.cohort.name == name]
        after = [(tq, tq.limits) for tq, _ in before if id(tq) not in changed]
        if quota.cohort == name:
            after += [(tq, new_limits) for tq in targets]
        for r in range(3):
            if _shortfall(after, r) > max(0, _shortfall(before, r)):
                raise InvalidQuota(
                    f"cohort {name} of pool {state.pool.name} would lend less {RESOURCE_NAMES[r]} than its "
                    f"members borrow now; lower it once jobs end"
                )


def _shortfall(members: list[tuple[TenantQueue, Limits]], r: int) -> int:
    lendable = sum(limits.lend[r] for _, limits in members)
    over = sum(max(0, tq.admitted_usage().as_tuple()[r] - limits.guaranteed[r]) for tq, limits in members)
    return over - lendable
