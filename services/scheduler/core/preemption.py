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

from collections.abc import Callable
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
    """Whether no preemption could make room: nothing it may preempt, the job is above its tenant's quota cap, or
    more than the READY nodes of the pool hold even empty."""
    tq = rec.tq
    job = rec.job
    borrowing = tq.borrowing_with(rec.total)
    cohort = tq.cohort
    if not tq.has_candidate_below(job.priority) and not (
        cohort is not None
        and any(
            other is not tq
            and other.candidates
            and (not borrowing or other.has_candidate_below(job.priority))
            and other.is_borrowing_in(rec.total)
            for other in cohort.members
        )
    ):
        return True
    cap = tq.limits.cap
    if any(rec.total[r] > cap[r] for r in range(3)):
        return True
    return state.ready_room(job.per_worker) < job.workers


def _quota_could_fit(rec: JobRecord, own: list[JobRecord], others: dict[TenantQueue, list[JobRecord]]) -> bool:
    """Whether ``rec`` would fit its quota if every candidate stopped (an upper bound, before any search)."""
    tq = rec.tq
    need = rec.total
    cohort = tq.cohort
    for r in range(3):
        if not need[r]:
            continue
        after = tq.used[r] - sum(v.total[r] for v in own) + need[r]
        if after > tq.limits.cap[r]:
            return False
        if cohort is not None:
            others_over = cohort.over[r] - tq.over(r)
            for other, victims in others.items():
                others_over -= min(other.over(r), sum(v.total[r] for v in victims))
            if max(0, after - tq.limits.guaranteed[r]) + others_over > cohort.lendable[r]:
                return False
    return True


def _usefulness(rec: JobRecord, state: PoolState) -> Callable[[JobRecord], bool]:
    """Whether stopping a job could help ``rec``: it holds a resource ``rec`` lacks quota for, or it runs on a
    READY node ``rec`` may use and holds something ``rec`` asks for."""
    need = rec.total
    short = [r for r in range(3) if need[r] and not rec.tq.fits(_only(need, r))]
    usable = {slot.name for slot in state.slots.values() if slot.ready and slot.matches(rec.job.per_worker)}

    def useful(victim: JobRecord) -> bool:
        held = victim.total
        if any(held[r] for r in short):
            return True
        return any(held[r] and need[r] for r in range(3)) and any(slot.name in usable for slot, _ in victim.placement)

    return useful


def _only(q: tuple[int, int, int], r: int) -> tuple[int, int, int]:
    return (q[0] if r == 0 else 0, q[1] if r == 1 else 0, q[2] if r == 2 else 0)


def _reachable(
    others: dict[TenantQueue, list[JobRecord]], need: tuple[int, int, int], borrowing: bool
) -> dict[TenantQueue, list[JobRecord]]:
    """Of each other tenant's candidates, those the search below could take, an upper bound (arithmetic only) to
    skip searches that cannot succeed: reclaim takes them in order while the tenant still borrows what the job
    needs, so exactly that prefix; under the strategies any of them may be reached."""
    out: dict[TenantQueue, list[JobRecord]] = {}
    for other, victims in others.items():
        used = other.effective()
        nominal = other.limits.nominal
        taken = []
        if borrowing:
            # The strategies may pass over a victim and take a later one: any of them may be reached.
            out[other] = victims
            continue
        for victim in reversed(victims):
            if not any(need[r] and used[r] > nominal[r] for r in range(3)):
                break
            taken.append(victim)
            for r in range(3):
                used[r] -= victim.total[r]
        if taken:
            out[other] = taken
    return out


def _room_without(rec: JobRecord, state: PoolState, victims: list[JobRecord]) -> bool:
    """Whether ``rec``'s workers would fit the READY nodes if all ``victims`` stopped (quota aside)."""
    request = rec.job.per_worker
    free = {slot.name: list(slot.free) for slot in state.slots.values() if slot.ready and slot.matches(request)}
    for victim in victims:
        for slot, n in victim.placement:
            room = free.get(slot.name)
            if room is not None:
                for r in range(3):
                    room[r] += victim.per_worker[r] * n
    return sum(workers_fitting(rec.per_worker, room) for room in free.values()) >= rec.job.workers


class _Search:
    """One victim search on the live accounting, every change undone by close(). It first takes out the jobs
    already chosen as victims (they are leaving: the search plans for the state once they have stopped), then the
    candidates it tries. Whether the job fits is kept incrementally: its quota check is O(1), and identical
    workers fit the nodes exactly when the workers each usable node has room for add up to the gang, which only
    a victim's nodes change."""

    def __init__(self, rec: JobRecord, state: PoolState) -> None:
        self.rec = rec
        self.state = state
        self.removed: list[JobRecord] = []
        self.leaving = list(state.leaving.values())
        for victim in self.leaving:
            _apply(victim, -1)
        q = rec.per_worker
        self.room = {
            slot: workers_fitting(q, slot.free)
            for slot in state.slots.values()
            if slot.ready and slot.matches(rec.job.per_worker)
        }
        self.total_room = sum(self.room.values())

    def _move(self, victim: JobRecord, sign: int) -> None:
        victim.tq.add(victim.total, sign)
        q = self.rec.per_worker
        for slot, n in victim.placement:
            slot.take(victim.per_worker, n, sign=sign)
            before = self.room.get(slot)
            if before is not None:
                after = workers_fitting(q, slot.free)
                self.room[slot] = after
                self.total_room += after - before

    def remove(self, victim: JobRecord) -> None:
        self._move(victim, -1)
        self.removed.append(victim)

    def put_back(self, victim: JobRecord) -> None:
        self._move(victim, 1)
        self.removed.remove(victim)

    def close(self) -> None:
        for victim in list(self.removed):
            self.put_back(victim)
        for victim in self.leaving:
            _apply(victim, 1)

    def fits(self) -> bool:
        rec = self.rec
        return self.total_room >= rec.job.workers and rec.tq.fits(rec.total)

    def placement(self) -> list[tuple[NodeSlot, int]] | None:
        rec = self.rec
        return place(self.state.slots.values(), rec.job.per_worker, rec.job.workers) if self.fits() else None


def _apply(victim: JobRecord, sign: int) -> None:
    """Takes a leaving victim out of (sign -1) or back into (1) the accounting, its ``leaving`` mark with it."""
    tq = victim.tq
    for r in range(3):
        tq.leaving[r] += sign * victim.total[r]
    tq.add(victim.total, sign)
    for slot, n in victim.placement:
        slot.take(victim.per_worker, n, sign=sign)


def find_victims(rec: JobRecord, state: PoolState) -> Plan | None:
    """The victims whose stop lets ``rec`` fit its quota and the pool's nodes, or None when no allowed set does. A
    plan without victims: it will fit once the jobs already chosen as victims have stopped."""
    search = _Search(rec, state)
    try:
        if search.fits():
            return Plan([], [])
        return _plan(rec, state, search)
    finally:
        search.close()


def _plan(rec: JobRecord, state: PoolState, search: _Search) -> Plan | None:
    tq = rec.tq
    job = rec.job
    total = rec.total
    borrowing = tq.borrowing_with(total)
    useful = _usefulness(rec, state)
    preemptor_share = tq.share(total)
    others: dict[TenantQueue, list[JobRecord]] = {}
    if tq.cohort is not None:
        for other in tq.cohort.members:
            if other is tq or not other.is_borrowing_in(total):
                continue
            if borrowing and not share_le(preemptor_share, other.share()):
                continue  # both strategies need the preemptor's share at most the other's, which only falls
            candidates = [
                v
                for v in other.admitted.values()
                if _eligible(v) and (not borrowing or v.job.priority < job.priority) and useful(v)
            ]
            if candidates:
                # Reversed, so pop() takes the lowest priority, most recently started first.
                others[other] = sorted(candidates, key=_victim_order, reverse=True)
    own = sorted(
        (v for v in tq.admitted.values() if _eligible(v) and v.job.priority < job.priority and useful(v)),
        key=_victim_order,
    )
    if not others and not own:
        return None
    reachable = _reachable(others, total, borrowing)
    if not _room_without(rec, state, [*own, *(v for vs in reachable.values() for v in vs)]):
        return None  # even all it may take would not free enough room on the nodes
    if not tq.fits(total) and not _quota_could_fit(rec, own, reachable):
        return None  # even all it may take would not free enough quota

    reasons: dict[str, str] = {}
    pool = state.pool.name
    chosen: list[JobRecord] = []

    def take(victim: JobRecord, reason: str) -> bool:
        chosen.append(victim)
        search.remove(victim)
        reasons[victim.job_id] = reason
        return search.fits()

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
    fair = f"preempted by job {job.job_id}: fair sharing in cohort {cohort_name} of pool {pool}"
    retry: dict[TenantQueue, list[JobRecord]] = {}
    while not fits:
        lender = borrower(others)
        if lender is None:
            break
        victim = others[lender].pop()
        if not borrowing:
            fits = take(victim, f"preempted by job {job.job_id}: tenant {tq.tenant} reclaims its quota in pool {pool}")
        elif share_le(preemptor_share, lender.share(victim.total, -1)):
            fits = take(victim, fair)
        else:
            retry.setdefault(lender, []).insert(0, victim)
    while not fits:
        lender = borrower(retry)
        if lender is None:
            break
        if share_lt(preemptor_share, lender.share()):
            fits = take(retry[lender].pop(), fair)
        else:
            del retry[lender]
    for victim in own:
        if fits:
            break
        fits = take(
            victim, f"preempted by job {job.job_id} of higher priority ({job.priority} > {victim.job.priority})"
        )
    if not fits:
        return None
    # Keep only the victims it needs: put back the last chosen first while the job still fits without them.
    for victim in reversed(list(search.removed)):
        search.put_back(victim)
        if not search.fits():
            search.remove(victim)
    placement = search.placement()
    assert placement is not None
    kept = set(map(id, search.removed))
    return Plan([(v, reasons[v.job_id]) for v in chosen if id(v) in kept], placement)  # in the order chosen
