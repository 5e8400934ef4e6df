"""The scheduler's value types: pools, nodes, quotas, jobs, and what a cycle decides (admissions, preemptions)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from services.scheduler.core.resources import Prices, Resources

__all__ = [
    "NodeState",
    "Node",
    "Pool",
    "Quota",
    "Job",
    "Admission",
    "Preemption",
    "CycleResult",
    "BudgetCheck",
    "MIN_PRIORITY",
    "MAX_PRIORITY",
    "DEFAULT_TENANT",
]

MIN_PRIORITY = 0
MAX_PRIORITY = 1000
#: Quota.tenant of a pool's default quota: every tenant without its own quota in the pool gets a copy of it.
DEFAULT_TENANT = ""

#: (tenant, estimated_cost_micros) -> (allowed, reason). Synchronous: the service answers from billing decisions it
#: fetched before the cycle. An allowed answer is followed by that job's admission, or by its preemptions; a
#: preemptor is asked again when its victims have stopped and it is admitted. A refusal keeps the pool in the next
#: cycle even if nothing else changes (credit may be granted meanwhile).
BudgetCheck = Callable[[str, int], tuple[bool, str]]


class NodeState(enum.Enum):
    READY = "READY"  # accepts new work
    DRAINING = "DRAINING"  # runs what it has, accepts nothing new
    NOT_READY = "NOT_READY"  # gone: its jobs are lost and returned to the service for requeueing


@dataclass(frozen=True)
class Pool:
    """A group of nodes sold at one default price, with a limit on how long a job may run."""

    name: str
    prices: Prices
    max_run_seconds: float
    executor: str = "local"


@dataclass(frozen=True)
class Node:
    """A machine of a pool. ``prices`` None means the pool's prices."""

    name: str
    pool: str
    capacity: Resources
    prices: Prices | None = None
    state: NodeState = NodeState.READY
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Quota:
    """A tenant's quota in one pool, with Kueue ClusterQueue semantics.

    ``nominal`` is guaranteed. Inside a non-empty ``cohort`` the tenant may borrow others' unused lendable quota up
    to ``borrowing_limit`` above nominal (None: no limit) and lends its own unused nominal up to ``lending_limit``
    (None: all of it). ``cohort`` "" means standalone: neither borrows nor lends. ``weight`` scales the fair share
    (0: always last, first to be preempted). ``max_running_jobs`` / ``max_queued_jobs`` 0 means no limit.
    ``tenant`` DEFAULT_TENANT ("") makes it the pool's default for tenants without a quota of their own."""

    tenant: str
    pool: str
    nominal: Resources
    borrowing_limit: Resources | None = None
    lending_limit: Resources | None = None
    cohort: str = ""
    weight: float = 1.0
    max_running_jobs: int = 0
    max_queued_jobs: int = 0


@dataclass(frozen=True)
class Job:
    """What the policy needs of a job: who, where, how much per worker, how many workers, how urgent.

    ``seq`` is the submission order (monotonic across the service; ties of priority are broken by it).
    ``max_run_seconds`` 0 means the pool's limit; it bounds the run and prices the budget estimate."""

    job_id: str
    tenant: str
    pool: str
    per_worker: Resources
    workers: int = 1
    priority: int = 0
    preemptible: bool = True
    seq: int = 0
    max_run_seconds: float = 0.0

    @property
    def total(self) -> Resources:
        return self.per_worker.scaled(self.workers)


@dataclass(frozen=True)
class Admission:
    """A job the cycle admitted: one node per worker (a gang gets all of them at once), and what it may cost."""

    job_id: str
    tenant: str
    pool: str
    nodes: tuple[str, ...]
    borrowing: bool
    estimated_cost_micros: int


@dataclass(frozen=True)
class Preemption:
    """A running job the cycle chose as a victim. It keeps its resources until the service calls release() (after
    SIGTERM and the grace period); ``by_job_id`` waits for it meanwhile."""

    job_id: str
    by_job_id: str
    reason: str


@dataclass
class CycleResult:
    """What one cycle decided. ``reasons``: queued jobs examined in this cycle whose waiting reason changed (the
    others' reason, derived from the jobs before them, is read with Scheduler.reason())."""

    admitted: list[Admission] = field(default_factory=list)
    preempted: list[Preemption] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
