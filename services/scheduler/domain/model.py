"""The scheduler service's records: jobs with their lifecycle, pools, nodes and quotas as stored, and allocations
(what a job attempt holds, from admission to release, for metering)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.scheduler.core import NodeState, Prices, Resources
from services.scheduler.executors import WorkerRef

__all__ = [
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "Allocation",
    "JobRecord",
    "JobState",
    "NodeRecord",
    "PoolRecord",
    "QuotaRecord",
    "StopKind",
]


class JobState(enum.Enum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
#: States in which a job holds an allocation (admitted and not yet released).
HOLDING_STATES = frozenset({JobState.SCHEDULED, JobState.RUNNING, JobState.CANCELLING, JobState.PREEMPTED})
ACTIVE_STATES = frozenset(JobState) - TERMINAL_STATES


class StopKind(enum.Enum):
    """Why the scheduler is stopping a running attempt."""

    NONE = ""
    CANCEL = "cancel"
    PREEMPT = "preempt"
    TIMEOUT = "timeout"
    #: Its node went NOT_READY: killed at once and requeued. The platform lost the node, not the job: like a
    #: preemption this does not count against max_retries (Kubernetes' pod failure policy treats a disruption so).
    LOST = "lost"


@dataclass
class JobRecord:
    """One job as stored. ``secret_env`` values live sealed in the store and in memory only while launching."""

    job_id: str
    tenant: str
    name: str
    pool: str
    per_worker: Resources
    workers: int
    priority: int
    preemptible: bool
    argv: tuple[str, ...]
    env: dict[str, str]
    secret_names: tuple[str, ...]
    sealed_secrets: bytes
    working_dir: str
    max_run_seconds: float
    max_retries: int
    grace_seconds: float
    trace_carrier: dict[str, str]
    labels: dict[str, str]
    idempotency_key: str
    submitted_by: str
    submit_ns: int
    seq: int = 0
    state: JobState = JobState.QUEUED
    state_reason: str = ""
    attempt: int = 1
    exit_code: int = 0
    start_ns: int = 0
    end_ns: int = 0
    run_ns: int = 0
    preemptions: int = 0
    failures: int = 0
    nodes: tuple[str, ...] = ()
    executor_ref: str = ""
    worker_refs: tuple[WorkerRef, ...] = ()
    admitted_ns: int = 0
    running_since_ns: int = 0
    estimated_cost_micros: int = 0
    stop: StopKind = StopKind.NONE
    stop_reason: str = ""
    #: When the running attempt is SIGKILLed if it has not exited (0: no stop in progress).
    kill_at_ns: int = 0
    #: Ray pools: the command is a Ray driver that places the workers itself (ExecutorSpec.driver).
    driver: bool = False
    #: Not stored: the queue position while QUEUED.
    queue_position: int = field(default=-1, compare=False)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def holding(self) -> bool:
        return self.state in HOLDING_STATES


@dataclass(frozen=True)
class PoolRecord:
    name: str
    executor: str
    prices: Prices
    max_run_seconds: float
    is_default: bool = False
    create_ns: int = 0
    update_ns: int = 0


@dataclass(frozen=True)
class NodeRecord:
    name: str
    pool: str
    capacity: Resources
    labels: dict[str, str]
    #: None: the pool's prices.
    prices: Prices | None
    state: NodeState
    heartbeat_ns: int = 0


@dataclass(frozen=True)
class QuotaRecord:
    tenant: str
    pool: str
    nominal: Resources
    borrowing_limit: Resources | None
    lending_limit: Resources | None
    cohort: str = ""
    weight: float = 1.0
    max_running_jobs: int = 0
    max_queued_jobs: int = 0
    update_ns: int = 0
    #: Set by the scheduler itself (a cluster pool's default, following the cluster as it grows), not by an operator.
    automatic: bool = False


@dataclass(frozen=True)
class Allocation:
    """What one attempt of a job holds: ``per_worker`` on each of ``nodes``, from ``admitted_ns`` to
    ``released_ns`` (0 while held). Metered window by window up to ``metered_until_ns``."""

    job_id: str
    attempt: int
    tenant: str
    pool: str
    nodes: tuple[str, ...]
    per_worker: Resources
    admitted_ns: int
    released_ns: int = 0
    metered_until_ns: int = 0

    @property
    def held_ns(self) -> int:
        return (self.released_ns - self.admitted_ns) if self.released_ns else 0
