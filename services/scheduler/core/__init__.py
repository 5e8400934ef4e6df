"""The scheduler's policy core (pure Python, no grpc, no I/O, no clock): resources and prices, Kueue-style quotas
and cohorts, dominant-resource fair sharing with its preemption strategies, gangs, cheapest placement and
budget-aware admission. The service around it persists, executes and meters; see Scheduler."""

from services.scheduler.core.errors import (
    DuplicateJob,
    InvalidConfig,
    InvalidJob,
    InvalidQuota,
    QueueFull,
    UnknownJob,
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
    "UnknownJob",
    "UnknownNode",
    "dominant_share",
    "drf_fair_shares",
]
