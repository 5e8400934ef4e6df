"""Victim selection for a job that does not fit: reclaim of borrowed quota, Kueue's fair-sharing strategies against
ping-pong, and priority within a tenant; the smallest set of preemptible victims that lets the job fit.

Candidates, in Kueue's order: first others' running work in the cohort (the tenant with the highest share first;
its lowest priority, then most recently started job first), then the tenant's own lower-priority work.
- Another tenant's job is a candidate only while that tenant borrows a resource the job needs (guaranteed
  nominal quota is never taken), and only below the preemptor's priority if the preemptor itself would borrow.
- Reclaim: a preemptor within its nominal quota may take any such borrowed work.
- Otherwise the strategies, tried in order: the preemptor's share with its job <= the victim tenant's share
  without the victim; then, for what that left, < the victim tenant's share before. Both stop two tenants from
  taking the same resources back and forth.
- A job already chosen as a victim, or not preemptible, is never a candidate.
The search removes candidates from the live accounting, checks quota and placement, and undoes every removal
before it returns: victims keep their resources until the service releases them.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.scheduler.core.placement import NodeSlot, place, workers_fitting
from services.scheduler.core.quota import TenantQueue, share_le, share_lt
from services.scheduler.core.state import JobRecord, PoolState

__all__ = ["Plan", "find_victims", "hopeless"]


@dataclass(frozen=True)
class Plan:
    """Victims (with the reason each is told) whose stop lets the preemptor fit, and where it will then run."""

    victims: list[tuple[JobRecord, str]]
    placement: list[tuple[NodeSlot, int]]


def _victim_order(rec: JobRecord) -> tuple[int, int]:
    return (rec.job.priority, -rec.admit_order)


def _eligible(rec: JobRecord) -> bool:
    return rec.job.preemptible and not rec.victim_of


def hopeless(rec: JobRecord, state: PoolState) -> bool:
    """Whether no preemption could ever make room: the job is above its tenant's quota cap, or more than the READY
    nodes of the pool hold even empty."""
    cap = rec.tq.limits.cap
    if any(rec.total[r] > cap[r] for r in range(3)):
        return True
    request = rec.job.per_worker
    room = 0
    for slot in state.slots.values():
        if slot.ready and slot.matches(request):
            room += workers_fitting(rec.per_worker, slot.cap)
    return room < rec.job.workers


class _Search:
    """One victim search: removals from the live accounting, undone by restore()."""

    def __init__(self, rec: JobRecord, state: PoolState) -> None:
        self.rec = rec
        self.state = state
        self.removed: list[JobRecord] = []

    def remove(self, victim: JobRecord) -> None:
        victim.tq.add(victim.total, -1)
        for slot, n in victim.placement:
            slot.take(victim.per_worker, n, sign=-1)
        self.removed.append(victim)

    def put_back(self, victim: JobRecord) -> None:
        victim.tq.add(victim.total, 1)
        for slot, n in victim.placement:
            slot.take(victim.per_worker, n)
        self.removed.remove(victim)

    def restore(self) -> None:
        for victim in list(self.removed):
            self.put_back(victim)

    def placement(self) -> list[tuple[NodeSlot, int]] | None:
        rec = self.rec
        if not rec.tq.fits(rec.total):
            return None
        return place(self.state.slots.values(), rec.job.per_worker, rec.job.workers)


def find_victims(rec: JobRecord, state: PoolState) -> Plan | None:
    """The victims whose stop lets ``rec`` fit its quota and the pool's nodes, or None when no allowed set does."""
    tq = rec.tq
    job = rec.job
    total = rec.total
    borrowing = tq.borrowing_with(total)
    others: dict[TenantQueue, list[JobRecord]] = {}
    if tq.cohort is not None:
        for other in tq.cohort.members:
            if other is tq:
                continue
            candidates = [
                v for v in other.admitted.values() if _eligible(v) and (not borrowing or v.job.priority < job.priority)
            ]
            if candidates:
                # Reversed, so pop() takes the lowest priority, most recently started first.
                others[other] = sorted(candidates, key=_victim_order, reverse=True)
    own = sorted((v for v in tq.admitted.values() if _eligible(v) and v.job.priority < job.priority), key=_victim_order)
    if not others and not own:
        return None

    search = _Search(rec, state)
    reasons: dict[str, str] = {}
    pool = state.pool.name
    preemptor_share = tq.share(total)

    def take(victim: JobRecord, reason: str) -> bool:
        search.remove(victim)
        reasons[victim.job_id] = reason
        return search.placement() is not None

    def borrower(candidates: dict[TenantQueue, list[JobRecord]]) -> TenantQueue | None:
        # The tenant with the highest share that still borrows what the job needs.
        best: TenantQueue | None = None
        best_share = -1.0
        for other, victims in candidates.items():
            if victims and other.is_borrowing_in(total):
                share = other.share()
                if share > best_share:
                    best, best_share = other, share
        return best

    fits = False
    cohort_name = tq.cohort.name if tq.cohort is not None else ""
    retry: dict[TenantQueue, list[JobRecord]] = {}
    while not fits:
        lender = borrower(others)
        if lender is None:
            break
        victim = others[lender].pop()
        if not borrowing:
            fits = take(victim, f"preempted by job {job.job_id}: tenant {tq.tenant} reclaims its quota in pool {pool}")
        elif share_le(preemptor_share, lender.share(victim.total, -1)):
            fits = take(victim, f"preempted by job {job.job_id}: fair sharing in cohort {cohort_name} of pool {pool}")
        else:
            retry.setdefault(lender, []).insert(0, victim)
    while not fits:
        lender = borrower(retry)
        if lender is None:
            break
        if share_lt(preemptor_share, lender.share()):
            victim = retry[lender].pop()
            fits = take(victim, f"preempted by job {job.job_id}: fair sharing in cohort {cohort_name} of pool {pool}")
        else:
            del retry[lender]
    for victim in own:
        if fits:
            break
        fits = take(
            victim, f"preempted by job {job.job_id} of higher priority ({job.priority} > {victim.job.priority})"
        )
    if not fits:
        search.restore()
        return None
    # Keep only the victims it needs: put back the last chosen first while the job still fits without them.
    for victim in reversed(list(search.removed)):
        search.put_back(victim)
        if search.placement() is None:
            search.remove(victim)
    placement = search.placement()
    assert placement is not None
    victims = [(v, reasons[v.job_id]) for v in search.removed]
    search.restore()
    return Plan(victims, placement)
