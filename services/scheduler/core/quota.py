"""Quota accounting with Kueue ClusterQueue semantics: a tenant's queue and usage in one pool, cohorts that lend and
borrow, the fit check and the dominant-resource share, all kept incrementally (O(1) per admission)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.scheduler.core.model import Quota
from services.scheduler.core.resources import RESOURCE_NAMES, Resources, format_amount

if TYPE_CHECKING:
    from services.scheduler.core.state import JobRecord

__all__ = ["TenantQueue", "Cohort", "Limits", "limits_of", "share_le", "share_lt", "UNLIMITED"]

#: A limit that is no limit (borrowing_limit None inside a cohort).
UNLIMITED = 2**62
_R = range(3)
# Shares are floats; two shares computed along different paths may differ in the last bit.
_EPSILON = 1e-12


@dataclass(frozen=True, slots=True)
class Limits:
    """A quota resolved per resource (cpu, memory, gpu): what the tenant may hold and how it lends."""

    nominal: tuple[int, int, int]
    lend: tuple[int, int, int]  # the part of nominal the cohort may use
    guaranteed: tuple[int, int, int]  # nominal - lend: only this tenant may use it
    cap: tuple[int, int, int]  # nominal + borrowing limit: never more than this
    weight: float
    max_running: int
    max_queued: int


_NO_QUOTA = Limits((0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), 1.0, 0, 0)


def limits_of(quota: Quota | None) -> Limits:
    """The per-resource limits of a quota (None: nothing at all may run)."""
    if quota is None:
        return _NO_QUOTA
    nominal = quota.nominal.as_tuple()
    if not quota.cohort:
        lend = (0, 0, 0)
        cap = nominal
    else:
        lend = nominal if quota.lending_limit is None else quota.lending_limit.as_tuple()
        borrow = quota.borrowing_limit
        cap = (
            (UNLIMITED,) * 3
            if borrow is None
            else (nominal[0] + borrow.cpu_millicores, nominal[1] + borrow.memory_bytes, nominal[2] + borrow.gpus)
        )
    guaranteed = (nominal[0] - lend[0], nominal[1] - lend[1], nominal[2] - lend[2])
    return Limits(
        nominal, lend, guaranteed, (cap[0], cap[1], cap[2]), quota.weight, quota.max_running_jobs, quota.max_queued_jobs
    )


class Cohort:
    """Tenants of one pool that lend and borrow among themselves: what they lend and what they use of it."""

    __slots__ = ("pool", "name", "members", "lendable", "over")

    def __init__(self, pool: str, name: str) -> None:
        self.pool = pool
        self.name = name
        self.members: list[TenantQueue] = []
        self.lendable = [0, 0, 0]  # sum of the members' lend
        self.over = [0, 0, 0]  # sum of the members' use beyond their guaranteed part

    def recompute(self) -> None:
        self.lendable = [sum(m.limits.lend[r] for m in self.members) for r in _R]
        self.over = [sum(m.over(r) for m in self.members) for r in _R]


class TenantQueue:
    """A tenant's queue, quota and usage in one pool (a Kueue ClusterQueue).

    ``queue`` is sorted by (-priority, seq, job_id); ``used`` counts admitted jobs plus the reservations of jobs
    waiting for their victims to stop (``reserved``), so nobody else takes what a preemption frees: quota checks
    use it. ``leaving`` is what its jobs chosen as victims still hold: borrowing and shares, which decide order and
    preemption, leave it out, or a tenant would look like a borrower while it swaps its own work (and be preempted
    for it, then reclaim: ping-pong)."""

    __slots__ = (
        "tenant",
        "pool",
        "quota",
        "from_default",
        "limits",
        "cohort",
        "queue",
        "used",
        "reserved",
        "leaving",
        "admitted",
        "candidates",
    )

    def __init__(self, tenant: str, pool: str) -> None:
        self.tenant = tenant
        self.pool = pool
        self.quota: Quota | None = None
        self.from_default = True
        self.limits = _NO_QUOTA
        self.cohort: Cohort | None = None
        self.queue: list[tuple[int, int, str]] = []
        self.used = [0, 0, 0]
        self.reserved = [0, 0, 0]
        self.leaving = [0, 0, 0]
        self.admitted: dict[str, JobRecord] = {}  # its running jobs (victims included until released)
        self.candidates: dict[int, int] = {}  # priority -> how many of them could still be chosen as victims

    def count_candidate(self, priority: int, n: int) -> None:
        count = self.candidates.get(priority, 0) + n
        if count:
            self.candidates[priority] = count
        else:
            del self.candidates[priority]

    def has_candidate_below(self, priority: int) -> bool:
        """Whether some running job of priority < ``priority`` is preemptible and not already a victim."""
        return any(p < priority for p in self.candidates)

    @property
    def running(self) -> int:
        return len(self.admitted)

    def over(self, r: int) -> int:
        return max(0, self.used[r] - self.limits.guaranteed[r])

    def admitted_usage(self) -> Resources:
        return Resources.of([self.used[r] - self.reserved[r] for r in _R])

    def add(self, q: tuple[int, int, int], sign: int) -> None:
        """Adds (sign 1) or removes (sign -1) ``q`` from the usage, keeping the cohort's totals in step."""
        cohort = self.cohort
        for r in _R:
            if q[r]:
                if cohort is not None:
                    before = self.over(r)
                    self.used[r] += sign * q[r]
                    cohort.over[r] += self.over(r) - before
                else:
                    self.used[r] += sign * q[r]

    def fits(self, q: tuple[int, int, int]) -> bool:
        """Whether ``q`` more fits the quota: the tenant's cap and, beyond its guaranteed part, what the cohort
        lends. A resource ``q`` does not ask for never blocks it (even if a lowered quota is overrun)."""
        limits = self.limits
        cohort = self.cohort
        for r in _R:
            need = q[r]
            if need:
                after = self.used[r] + need
                if after > limits.cap[r]:
                    return False
                if cohort is not None:
                    guaranteed = limits.guaranteed[r]
                    over_after = after - guaranteed if after > guaranteed else 0
                    if cohort.over[r] - self.over(r) + over_after > cohort.lendable[r]:
                        return False
        return True

    def borrowing_with(self, q: tuple[int, int, int]) -> bool:
        """Whether holding ``q`` more would take the tenant above its nominal quota in some resource (what its
        victims hold left out)."""
        return any(self.used[r] - self.leaving[r] + q[r] > self.limits.nominal[r] for r in _R)

    def is_borrowing_in(self, resources: tuple[int, int, int]) -> bool:
        """Whether the tenant uses more than its nominal quota of a resource ``resources`` asks for."""
        return any(resources[r] and self.used[r] - self.leaving[r] > self.limits.nominal[r] for r in _R)

    def share(self, delta: tuple[int, int, int] | None = None, sign: int = 1) -> float:
        """The dominant share of what the tenant borrows (usage above nominal over what its cohort lends), divided
        by its weight, with ``delta`` added (sign 1) or removed (sign -1). 0 when not borrowing; a weight of 0
        makes any borrowing infinitely expensive."""
        used = self.effective()
        if delta is not None:
            for r in _R:
                used[r] += sign * delta[r]
        return self.share_at(used)

    def effective(self) -> list[int]:
        """Usage without what its victims still hold."""
        return [self.used[0] - self.leaving[0], self.used[1] - self.leaving[1], self.used[2] - self.leaving[2]]

    def share_at(self, used: Sequence[int]) -> float:
        """share() for the given usage."""
        cohort = self.cohort
        if cohort is None:
            return 0.0
        limits = self.limits
        best = 0.0
        for r in _R:
            lendable = cohort.lendable[r]
            if lendable > 0:
                borrowed = used[r] - limits.nominal[r]
                if borrowed > 0 and borrowed / lendable > best:
                    best = borrowed / lendable
        if best == 0.0:
            return 0.0
        return math.inf if limits.weight == 0 else best / limits.weight

    def why_not(self, q: tuple[int, int, int]) -> str:
        """Why ``q`` does not fit, e.g. "waiting for quota: 2/2 GPUs in use in pool default"."""
        if self.quota is None:
            return f"waiting for quota: tenant {self.tenant} has no quota in pool {self.pool}"
        stopping = [m for m in (self.cohort.members if self.cohort is not None else [self]) if any(m.leaving)]
        if stopping:
            held = [(m, (m.leaving[0], m.leaving[1], m.leaving[2])) for m in stopping]
            for member, leaving in held:
                member.add(leaving, -1)
            fits_once_stopped = self.fits(q)
            for member, leaving in held:
                member.add(leaving, 1)
            if fits_once_stopped:
                return f"waiting for preempted jobs in pool {self.pool} to stop"
        limits = self.limits
        cohort = self.cohort
        for r in _R:
            need = q[r]
            if not need:
                continue
            # What the tenant holds or has been promised, its victims left out.
            used, after = self.used[r] - self.leaving[r], self.used[r] + need
            name = RESOURCE_NAMES[r]
            if after > limits.cap[r]:
                if limits.cap[r] < need:
                    return (
                        f"waiting for quota: needs {format_amount(r, need)} but the quota allows at most "
                        f"{format_amount(r, limits.cap[r])} in pool {self.pool}"
                    )
                return (
                    f"waiting for quota: {name} {_plain(r, used)}/{_plain(r, limits.cap[r])} in use in pool {self.pool}"
                )
            if cohort is not None:
                guaranteed = limits.guaranteed[r]
                over_after = max(0, after - guaranteed)
                others = cohort.over[r] - self.over(r)
                if others + over_after > cohort.lendable[r]:
                    if after <= limits.nominal[r]:
                        return (
                            f"waiting for quota: {name} {_plain(r, used)}/{_plain(r, limits.nominal[r])} of nominal "
                            f"in use in pool {self.pool}, the rest is lent in cohort {cohort.name} until reclaimed"
                        )
                    left = max(0, cohort.lendable[r] - others - max(0, used - guaranteed))
                    return (
                        f"waiting for quota: {name} {_plain(r, used)}/{_plain(r, limits.nominal[r])} of nominal in "
                        f"use in pool {self.pool}, cohort {cohort.name} has {format_amount(r, left)} left to lend"
                    )
        return ""

    def why_max_running(self) -> str:
        return f"waiting for quota: {self.running}/{self.limits.max_running} running jobs in pool {self.pool}"

    def at_max_running(self) -> bool:
        return self.limits.max_running > 0 and self.running >= self.limits.max_running


def _plain(r: int, value: int) -> str:
    if value >= UNLIMITED:
        return "unlimited"
    return format_amount(r, value).split(" ")[0] if r != 1 else format_amount(r, value)


def share_le(a: float, b: float) -> bool:
    return a <= b + _EPSILON


def share_lt(a: float, b: float) -> bool:
    return a < b - _EPSILON
