"""The scheduler's mutable bookkeeping: one record per known job and one state per pool (nodes, tenants, cohorts)."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from services.scheduler.core.model import Job, Pool, Quota
from services.scheduler.core.placement import NodeSlot, capacity_reason, ready_room
from services.scheduler.core.quota import Cohort, TenantQueue, limits_of
from services.scheduler.core.resources import Resources, cost_micros_of_rate

__all__ = ["JobRecord", "PoolState", "queue_key"]


def queue_key(job: Job) -> tuple[int, int, str]:
    """A job's place in its tenant's queue: higher priority first, then earlier submission."""
    return (-job.priority, job.seq, job.job_id)


@dataclass(eq=False, slots=True)
class JobRecord:
    """A job the scheduler knows: queued (maybe waiting for its victims, holding a reservation) or admitted (maybe
    chosen as a victim, still holding its resources until released)."""

    job: Job
    tq: TenantQueue
    key: tuple[int, int, str]
    per_worker: tuple[int, int, int]
    total: tuple[int, int, int]
    admitted: bool = False
    placement: list[tuple[NodeSlot, int]] = field(default_factory=list)  # admitted: where it runs
    admit_order: int = 0  # later admissions lose less work when preempted
    borrowing: bool = False
    victim_of: str = ""  # the preemptor waiting for this job to stop
    waiting_for: set[str] = field(default_factory=set)  # this job's victims still running
    reservation: list[tuple[NodeSlot, int]] = field(default_factory=list)  # queued: nodes kept for it
    reason: str = ""
    search_generation: int = -1  # the state generation of its last fruitless victim search

    @property
    def job_id(self) -> str:
        return self.job.job_id


class PoolState:
    """A pool with its nodes, its tenants' queues and cohorts, its default quota and its waiting preemptors."""

    __slots__ = (
        "pool",
        "slots",
        "tenants",
        "cohorts",
        "default_quota",
        "records",
        "waiting",
        "scan_end",
        "dirty",
        "generation",
        "admissions",
        "rooms",
        "leaving",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.slots: dict[str, NodeSlot] = {}
        self.tenants: dict[str, TenantQueue] = {}
        self.cohorts: dict[str, Cohort] = {}
        self.default_quota: Quota | None = None
        self.records: dict[str, JobRecord] = {}  # every job of the pool, queued or admitted
        self.waiting: dict[str, JobRecord] = {}  # preemptors waiting for their victims, in nomination order
        # Per tenant, where the last cycle's scan of its queue stopped (the last key it examined, None: none) and
        # the reason of the jobs after it when one reason covers them all (None: they wait behind the others).
        self.scan_end: dict[str, tuple[tuple[int, int, str] | None, str | None]] = {}
        self.dirty = True  # something changed since the last cycle
        self.generation = 0  # bumped by every change of usage, quota or nodes
        self.admissions = 0
        self.leaving: dict[str, JobRecord] = {}  # admitted jobs chosen as victims, until released
        self.rooms: dict[tuple[tuple[int, int, int], str], int] = {}  # ready_room() by request, until nodes change

    def nodes_changed(self) -> None:
        self.rooms.clear()
        self.touch()

    def ready_room(self, request: Resources) -> int:
        """How many workers of ``request`` the READY nodes could hold if they were empty (cached)."""
        key = (request.as_tuple(), request.gpu_type)
        room = self.rooms.get(key)
        if room is None:
            room = self.rooms[key] = ready_room(self.slots.values(), request)
        return room

    def capacity_reason(self, job: Job) -> str:
        return capacity_reason(job.per_worker, job.workers, self.pool.name, self.ready_room(job.per_worker))

    def touch(self) -> None:
        """Something that may change a cycle's outcome and a victim search's changed (usage, quotas, nodes)."""
        self.dirty = True
        self.generation += 1

    def admit(self, rec: JobRecord, placement: list[tuple[NodeSlot, int]]) -> None:
        """Accounts an admitted job (already out of its queue) on its tenant's quota and its nodes."""
        tq = rec.tq
        rec.borrowing = tq.borrowing_with(rec.total)
        tq.add(rec.total, 1)
        for slot, n in placement:
            slot.take(rec.per_worker, n)
            slot.jobs[rec.job_id] = n
        tq.admitted[rec.job_id] = rec
        if rec.job.preemptible:
            tq.count_candidate(rec.job.priority, 1)
        rec.admitted = True
        rec.placement = placement
        self.admissions += 1
        rec.admit_order = self.admissions
        rec.reason = ""
        self.touch()

    def mark_victim(self, rec: JobRecord, preemptor: JobRecord) -> None:
        rec.victim_of = preemptor.job_id
        preemptor.waiting_for.add(rec.job_id)
        rec.tq.count_candidate(rec.job.priority, -1)
        self.leaving[rec.job_id] = rec
        for r in range(3):
            rec.tq.leaving[r] += rec.total[r]

    def unadmit(self, rec: JobRecord) -> None:
        """Returns an admitted job's resources."""
        tq = rec.tq
        tq.add(rec.total, -1)
        if rec.victim_of:
            for r in range(3):
                tq.leaving[r] -= rec.total[r]
            del self.leaving[rec.job_id]
        elif rec.job.preemptible:
            tq.count_candidate(rec.job.priority, -1)
        for slot, n in rec.placement:
            slot.take(rec.per_worker, n, sign=-1)
            del slot.jobs[rec.job_id]
        del tq.admitted[rec.job_id]
        rec.admitted = False
        rec.placement = []
        self.touch()

    def reserve(self, rec: JobRecord, placement: list[tuple[NodeSlot, int]]) -> None:
        """Keeps quota and node room for a preemptor until its victims stop (nobody else may take what they free)."""
        tq = rec.tq
        tq.add(rec.total, 1)
        for r in range(3):
            tq.reserved[r] += rec.total[r]
        for slot, n in placement:
            slot.take(rec.per_worker, n, reservation=True)
        rec.reservation = placement
        self.touch()

    def drop_reservation(self, rec: JobRecord) -> None:
        if not rec.reservation:
            return
        tq = rec.tq
        tq.add(rec.total, -1)
        for r in range(3):
            tq.reserved[r] -= rec.total[r]
        for slot, n in rec.reservation:
            slot.take(rec.per_worker, n, reservation=True, sign=-1)
        rec.reservation = []
        self.touch()

    def unqueue(self, rec: JobRecord) -> None:
        queue = rec.tq.queue
        i = bisect_left(queue, rec.key)
        if i < len(queue) and queue[i] == rec.key:
            del queue[i]

    def run_seconds(self, job: Job) -> float:
        return job.max_run_seconds or self.pool.max_run_seconds

    def estimate_micros(self, rec: JobRecord, placement: list[tuple[NodeSlot, int]]) -> int:
        """Requested resources x each node's price x the job's max run duration, rounded up once."""
        request = rec.job.per_worker
        rate = sum(slot.prices.rate(request, slot.gpu_type) * n for slot, n in placement)
        return cost_micros_of_rate(rate, self.run_seconds(rec.job))

    def tenant(self, name: str) -> TenantQueue:
        """The tenant's queue in this pool, created on first use with the pool's default quota."""
        tq = self.tenants.get(name)
        if tq is None:
            tq = TenantQueue(name, self.pool.name)
            self.tenants[name] = tq
            self.assign(tq, self.default_quota, from_default=True)
        return tq

    def assign(self, tq: TenantQueue, quota: Quota | None, *, from_default: bool) -> None:
        """Gives ``tq`` a quota, moving it between cohorts and recomputing their totals."""
        old = tq.cohort
        if old is not None:
            old.members.remove(tq)
        tq.quota = quota
        tq.from_default = from_default
        tq.limits = limits_of(quota)
        name = quota.cohort if quota is not None else ""
        tq.cohort = None
        if name:
            cohort = self.cohorts.get(name)
            if cohort is None:
                cohort = self.cohorts[name] = Cohort(self.pool.name, name)
            cohort.members.append(tq)
            tq.cohort = cohort
            cohort.recompute()
        if old is not None and old is not tq.cohort:
            if old.members:
                old.recompute()
            else:
                del self.cohorts[old.name]
