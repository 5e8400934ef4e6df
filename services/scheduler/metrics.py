"""The scheduler's own figures, per pool (pools are the operator's, so the labels are bounded): the queue, the
jobs admitted, what they hold against the pool's capacity, admissions, preemptions, ended jobs, and how long a
scheduling cycle takes. Gauges are set at the end of every cycle (the cycle runs whenever anything changes, and
every AIDC_SCHEDULER_CYCLE_INTERVAL_SECONDS), on the event loop that owns the policy's state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram

from services.mesh.metrics import child
from services.scheduler.core.resources import Resources

__all__ = ["SchedulerMetrics", "PoolFigures"]

QUEUE = Gauge("aidc_scheduler_queue_depth", "Jobs queued (waiting for admission) in the pool.", ["pool"])
ADMITTED = Gauge("aidc_scheduler_admitted_jobs", "Jobs admitted (holding resources) in the pool.", ["pool"])
ALLOCATED = Gauge(
    "aidc_scheduler_allocated",
    "Resources held by admitted jobs in the pool: cpu_millicores, memory_bytes or gpus.",
    ["pool", "resource"],
)
CAPACITY = Gauge(
    "aidc_scheduler_capacity",
    "Resources of the pool's ready nodes: cpu_millicores, memory_bytes or gpus.",
    ["pool", "resource"],
)
ADMISSIONS = Counter("aidc_scheduler_admissions", "Jobs admitted by the scheduling cycle.", ["pool"])
PREEMPTIONS = Counter("aidc_scheduler_preemptions", "Admitted jobs preempted for others.", ["pool"])
FINISHED = Counter("aidc_scheduler_jobs_finished", "Jobs that ended, by final state.", ["pool", "state"])
CYCLE = Histogram(
    "aidc_scheduler_cycle_seconds",
    "Time one scheduling cycle takes (the policy's decisions and storing them).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
_RESOURCES = ("cpu_millicores", "memory_bytes", "gpus")


class PoolFigures(Protocol):
    """What the policy core knows about its pools."""

    def queued_count(self, pool: str | None = None) -> int: ...

    def admitted_count(self, pool: str | None = None) -> int: ...

    def allocated(self, pool: str) -> Resources: ...

    def capacity(self, pool: str) -> Resources: ...


class SchedulerMetrics:
    """Records the cycle's outcome (no-ops with metrics off); handed to the JobScheduler by the server's wiring."""

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self.cycle_seconds: Any = child(enabled, CYCLE)

    def admitted(self, pool: str) -> None:
        child(self._enabled, ADMISSIONS, pool).inc()

    def preempted(self, pool: str) -> None:
        child(self._enabled, PREEMPTIONS, pool).inc()

    def finished(self, pool: str, state: str) -> None:
        child(self._enabled, FINISHED, pool, state).inc()

    def pools(self, policy: PoolFigures, pools: Iterable[str]) -> None:
        """The gauges of every pool, after a cycle."""
        if not self._enabled:
            return
        for pool in pools:
            try:
                allocated, capacity = policy.allocated(pool), policy.capacity(pool)
            except ValueError:  # a pool the policy does not hold (yet): nothing to report, never a failed cycle
                continue
            ADMISSIONS.labels(pool)  # exists from the first cycle on: "no admission for a while" is then a 0
            PREEMPTIONS.labels(pool)
            QUEUE.labels(pool).set(policy.queued_count(pool))
            ADMITTED.labels(pool).set(policy.admitted_count(pool))
            for kind, value in zip(_RESOURCES, allocated.as_tuple(), strict=True):
                ALLOCATED.labels(pool, kind).set(value)
            for kind, value in zip(_RESOURCES, capacity.as_tuple(), strict=True):
                CAPACITY.labels(pool, kind).set(value)
