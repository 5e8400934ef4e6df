"""What the training core needs from the scheduler: submit a job's run (acting for its submitter), follow it, cancel
it, and find the output of its attempts. Pure Python; services/training/scheduling.py implements it over the
scheduler's client."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.training.core.model import ComputeSpec

__all__ = ["ComputeScheduler", "RunRequest", "ScheduledRun", "SCHEDULER_TERMINAL"]

#: Scheduler states after which nothing changes.
SCHEDULER_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class RunRequest:
    """A job's run as a scheduler job: the runner's argv in the job's directory, with its resources."""

    tenant: str
    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    #: Stored sealed by the scheduler and never returned (e.g. an OTLP backend's credentials).
    secret_env: Mapping[str, str]
    working_dir: Path
    compute: ComputeSpec
    labels: Mapping[str, str]
    #: The training job id: submitting twice (a retry, or after a restart) queues one scheduler job.
    idempotency_key: str
    trace_carrier: Mapping[str, str]


@dataclass(frozen=True)
class ScheduledRun:
    """The scheduler's view of a run: placement and resources."""

    job_id: str
    #: "queued", "scheduled", "running", "preempted", "cancelling", "succeeded", "failed" or "cancelled".
    state: str
    reason: str
    #: Position in the pool's queue while queued, else -1.
    queue_position: int
    #: From 1; increases each time the run is requeued (after a preemption, or a retry).
    attempt: int
    exit_code: int
    nodes: tuple[str, ...]
    preemptions: int

    @property
    def terminal(self) -> bool:
        return self.state in SCHEDULER_TERMINAL


class ComputeScheduler(Protocol):
    """The scheduler, called as whoever ``current_principal`` names (the job's submitter)."""

    async def submit(self, request: RunRequest) -> ScheduledRun:
        """Queues the run (idempotent on ``request.idempotency_key``)."""
        ...

    async def run(self, tenant: str, job_id: str) -> ScheduledRun: ...

    def watch(self, tenant: str, job_id: str) -> AsyncGenerator[ScheduledRun, None]:
        """The run now (unless it has ended), then each change, until it ends."""
        ...

    async def cancel(self, tenant: str, job_id: str, reason: str) -> ScheduledRun: ...

    def output_file(self, working_dir: Path, job_id: str, attempt: int) -> Path:
        """Where the runner's stdout of one attempt is written."""
        ...
