"""The scheduler's policy core (pure Python, no grpc, no I/O, no clock): resources and prices, Kueue-style quotas
and cohorts, dominant-resource fair sharing with its preemption strategies, gangs, cheapest placement and
budget-aware admission. The service around it persists, executes and meters; see Scheduler.

Choices where SCHEDULING.md is silent:
- A tenant without a quota in a pool gets the pool's default (Quota.tenant DEFAULT_TENANT), or runs nothing.
- A queued job does not block the jobs behind it (Kueue's BestEffortFIFO); a large gang can wait long while
  smaller work backfills, unless it has the higher priority.
- A job above its tenant's quota cap stays queued with the reason (quotas change); a job no node set of its pool
  could ever hold is refused at validate().
- Another tenant's work is preempted only in the same cohort and while that tenant borrows; priority alone never
  crosses tenants.
- queue_position() counts within the tenant's own queue in the pool.
- A NOT_READY node's jobs are released by the core and returned for the service to requeue.
"""

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
    Admission,
    BudgetCheck,
    CycleResult,
    Job,
    Node,
    NodeState,
    Pool,
    Preemption,
    Quota,
)
from services.scheduler.core.resources import GIB, Prices, Resources
from services.scheduler.core.scheduler import DEFAULT_LOOKAHEAD, MAX_WORKERS, Scheduler

__all__ = [
    "Admission",
    "BudgetCheck",
    "CycleResult",
    "DEFAULT_LOOKAHEAD",
    "DEFAULT_TENANT",
    "DuplicateJob",
    "GIB",
    "InvalidConfig",
    "InvalidJob",
    "InvalidQuota",
    "Job",
    "MAX_PRIORITY",
    "MAX_WORKERS",
    "MIN_PRIORITY",
    "Node",
    "NodeState",
    "Pool",
    "Preemption",
    "Prices",
    "QueueFull",
    "Quota",
    "Resources",
    "Scheduler",
    "UnknownNode",
    "dominant_share",
    "drf_fair_shares",
]
