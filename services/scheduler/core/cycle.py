"""One scheduling cycle of one pool: admit queued jobs in fair-share order, nominate victims where a job may
preempt, and say why every examined job still waits.

Order: the tenant whose share would be lowest after admitting its next job goes first (ties: higher priority,
then earlier submission); inside a tenant, priority then submission order. A job that cannot be admitted does not
block the jobs behind it (Kueue's BestEffortFIFO), but a tenant's scan stops after ``lookahead`` refusals in one
cycle; the quota check is O(1), and a job at least as large as one that already failed on capacity in this cycle,
or larger than any node's free room, fails without a placement scan (free room only shrinks during a cycle).
Victim searches stop for a tenant after a few fruitless ones. That keeps a cycle proportional to what it admits,
not to the depth of the queue (kueue #14477).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from services.scheduler.core.model import Admission, BudgetCheck, CycleResult, Preemption
from services.scheduler.core.placement import NodeSlot, place
from services.scheduler.core.preemption import find_victims, hopeless
from services.scheduler.core.quota import TenantQueue
from services.scheduler.core.state import JobRecord, PoolState

__all__ = ["run_cycle", "waiting_reason"]

_ADMITTED, _REFUSED, _WAITING, _SKIPPED = range(4)
# Victim searches that found nothing before a tenant's scan stops searching in a cycle.
_FRUITLESS_SEARCHES = 4
# How many failed shapes to compare a job with before placing it.
_REMEMBERED_FAILURES = 8


def waiting_reason(victims: set[str]) -> str:
    """e.g. "waiting for preempted job j-1 to stop"."""
    names = sorted(victims)
    if len(names) == 1:
        return f"waiting for preempted job {names[0]} to stop"
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"waiting for preempted jobs {shown} to stop"


@dataclass(eq=False)
class _Scan:
    """A tenant's progress through its queue during one cycle."""

    tq: TenantQueue
    index: int = 0
    refusals: int = 0
    fruitless_searches: int = 0
    last: tuple[int, int, str] | None = None


class _PoolCycle:
    """One cycle of one pool: the waiting preemptors whose victims have stopped first, then the fair-share scan."""

    def __init__(self, state: PoolState, budget: BudgetCheck, result: CycleResult, lookahead: int) -> None:
        self.state = state
        self.budget = budget
        self.result = result
        self.lookahead = lookahead
        self.capacity_failures: list[tuple[tuple[int, int, int], int, str]] = []  # (per worker, workers, GPU type)
        self.capacity_reasons: dict[tuple[tuple[int, int, int], int, str], str] = {}  # failed shapes this cycle
        self.tried: set[str] = set()
        self.budget_refused = False
        # The most any READY node has free, per resource: an upper bound for the whole cycle (usage only grows).
        self.max_free = [0, 0, 0]

    def run(self) -> None:
        state = self.state
        state.dirty = False
        self.admit_unblocked_preemptors()
        for slot in state.slots.values():
            if slot.ready:
                self.max_free = [max(self.max_free[r], slot.free[r]) for r in range(3)]
        heap: list[tuple[float, int, int, str, _Scan]] = []
        for name, tq in state.tenants.items():
            if not tq.queue:
                state.scan_end.pop(name, None)
            elif tq.at_max_running():
                state.scan_end[name] = (None, tq.why_max_running())
            else:
                self.push(heap, _Scan(tq))
        while heap:
            scan = heapq.heappop(heap)[-1]
            tq = scan.tq
            key = tq.queue[scan.index]
            scan.last = key
            outcome = self.examine(state.records[key[2]], scan)
            if outcome == _ADMITTED:
                if tq.at_max_running():
                    self.stop(scan, tq.why_max_running())
                    continue
            else:
                scan.index += 1
                if outcome == _REFUSED:
                    scan.refusals += 1
                    if scan.refusals >= self.lookahead:
                        self.stop(scan, None)
                        continue
            if scan.index < len(tq.queue):
                self.push(heap, scan)
            else:
                self.stop(scan, None)
        if self.budget_refused:
            state.dirty = True  # the budget may allow it next time without any change here

    def push(self, heap: list[tuple[float, int, int, str, _Scan]], scan: _Scan) -> None:
        neg_priority, seq, job_id = scan.tq.queue[scan.index]
        share = scan.tq.share(self.state.records[job_id].total)
        heapq.heappush(heap, (share, neg_priority, seq, job_id, scan))

    def stop(self, scan: _Scan, tail_reason: str | None) -> None:
        self.state.scan_end[scan.tq.tenant] = (scan.last, tail_reason)

    def set_reason(self, rec: JobRecord, reason: str) -> None:
        if rec.reason != reason:
            rec.reason = reason
            self.result.reasons[rec.job_id] = reason

    def admit_unblocked_preemptors(self) -> None:
        state = self.state
        for rec in list(state.waiting.values()):
            if rec.waiting_for:
                self.set_reason(rec, waiting_reason(rec.waiting_for))
                continue
            del state.waiting[rec.job_id]
            state.drop_reservation(rec)
            self.tried.add(rec.job_id)
            if not rec.tq.fits(rec.total):
                self.set_reason(rec, rec.tq.why_not(rec.total))
                continue
            job = rec.job
            placement = place(state.slots.values(), job.per_worker, job.workers)
            if placement is None:
                self.set_reason(rec, state.capacity_reason(job))
            elif self.pays(rec, placement):
                state.unqueue(rec)
                self.admit(rec, placement)

    def pays(self, rec: JobRecord, placement: list[tuple[NodeSlot, int]]) -> bool:
        allowed, why = self.budget(rec.job.tenant, self.state.estimate_micros(rec, placement))
        if not allowed:
            self.budget_refused = True
            self.set_reason(rec, f"waiting for budget: {why}")
        return allowed

    def admit(self, rec: JobRecord, placement: list[tuple[NodeSlot, int]]) -> None:
        cost = self.state.estimate_micros(rec, placement)
        self.state.admit(rec, placement)
        nodes = tuple(slot.name for slot, n in placement for _ in range(n))
        job = rec.job
        self.result.admitted.append(Admission(job.job_id, job.tenant, job.pool, nodes, rec.borrowing, cost))
        self.result.reasons.pop(job.job_id, None)

    def examine(self, rec: JobRecord, scan: _Scan) -> int:
        state = self.state
        if rec.job_id in state.waiting or rec.job_id in self.tried:
            return _SKIPPED
        tq = scan.tq
        total = rec.total
        if not tq.fits(total):
            why = tq.why_not(total)
        else:
            why = self.known_capacity_failure(rec)
            placement = None if why else place(state.slots.values(), rec.job.per_worker, rec.job.workers)
            if placement is not None:
                if self.pays(rec, placement):
                    state.unqueue(rec)
                    self.admit(rec, placement)
                    return _ADMITTED
                return _REFUSED
            if not why:
                why = self.capacity_failure(rec)
        # Victim searches go on while they succeed; a few fruitless ones end them for this tenant and cycle (one
        # would let a head that cannot preempt starve the jobs behind it that could).
        if (
            scan.fruitless_searches < _FRUITLESS_SEARCHES
            and rec.search_generation != state.generation
            and not hopeless(rec, state)
        ):
            plan = find_victims(rec, state)
            if plan is None:
                scan.fruitless_searches += 1
                rec.search_generation = state.generation
            elif not plan.victims:
                self.set_reason(rec, f"waiting for preempted jobs in pool {state.pool.name} to stop")
                return _REFUSED
            elif self.pays(rec, plan.placement):
                for victim, reason in plan.victims:
                    state.mark_victim(victim, rec)
                    self.result.preempted.append(Preemption(victim.job_id, rec.job_id, reason))
                state.reserve(rec, plan.placement)
                state.waiting[rec.job_id] = rec
                self.set_reason(rec, waiting_reason(rec.waiting_for))
                return _WAITING
            else:
                scan.fruitless_searches += 1
                return _REFUSED
        self.set_reason(rec, why)
        return _REFUSED

    def known_capacity_failure(self, rec: JobRecord) -> str:
        """The reason ``rec`` cannot be placed, when that is known without a placement: a job of its shape, or one it
        is at least as large as, already failed in this cycle, or it is larger than any node's free room."""
        q = rec.per_worker
        job = rec.job
        gpu_type = job.per_worker.gpu_type
        shape = (q, job.workers, gpu_type)
        known = self.capacity_reasons.get(shape)
        if known is not None:
            return known
        failed = q[0] > self.max_free[0] or q[1] > self.max_free[1] or q[2] > self.max_free[2]
        for failed_q, workers, failed_type in self.capacity_failures:
            if failed:
                break
            failed = (
                job.workers >= workers
                and q[0] >= failed_q[0]
                and q[1] >= failed_q[1]
                and q[2] >= failed_q[2]
                and (not failed_type or failed_type == gpu_type)
            )
        return self.capacity_failure(rec) if failed else ""

    def capacity_failure(self, rec: JobRecord) -> str:
        """Records that ``rec``'s shape does not fit in this cycle and says why (the reason is about ``rec`` itself,
        never another job's)."""
        job = rec.job
        shape = (rec.per_worker, job.workers, job.per_worker.gpu_type)
        reason = self.state.capacity_reason(job)
        self.capacity_reasons[shape] = reason
        if len(self.capacity_failures) < _REMEMBERED_FAILURES:
            self.capacity_failures.append(shape)
        return reason


def run_cycle(state: PoolState, budget: BudgetCheck, result: CycleResult, lookahead: int) -> None:
    """Runs one cycle of ``state``'s pool, adding what it decides to ``result``."""
    _PoolCycle(state, budget, result, lookahead).run()
