"""Records of the training service: jobs and their events, base models, models, versions and aliases."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "ComputeSpec",
    "JobState",
    "TERMINAL_STATES",
    "ACTIVE_STATES",
    "DatasetVersion",
    "JobSpec",
    "JobRecord",
    "JobEvent",
    "ArtifactEntry",
    "ModelRecord",
    "ModelVersionRecord",
    "BaseModelRecord",
]


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    EXPORTING = "exporting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
#: States of a job the service follows in the scheduler (again after a restart).
ACTIVE_STATES = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.EXPORTING, JobState.CANCELLING})


@dataclass(frozen=True)
class DatasetVersion:
    """A resolved version of a storage dataset."""

    name: str
    version: int
    sha256: str = ""
    size_bytes: int = 0
    rows: int = 0


@dataclass(frozen=True)
class JobSpec:
    """What a job runs: the runner's FineTuneSpec (as JSON-shaped data, base_model holding the *name*), the
    dataset and the registry model its result becomes a version of."""

    base_model: str
    dataset: DatasetVersion
    output_model: str
    runner: dict[str, Any]


@dataclass(frozen=True)
class ComputeSpec:
    """What a job's run asks of the scheduler: resources per worker, pool, priority, whether it may be preempted, and
    its longest run (0: the pool's limit). Defaults are resolved at submission."""

    cpu_millicores: int = 0
    memory_bytes: int = 0
    gpu_count: int = 0
    gpu_type: str = ""
    pool: str = ""
    priority: int = 0
    preemptible: bool = False
    max_run_seconds: float = 0.0


@dataclass
class JobRecord:
    tenant: str
    job_id: str
    spec: JobSpec
    state: JobState
    created_by: str
    created_at: datetime
    request_id: str = ""
    error: str = ""
    progress: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0
    model: str = ""
    model_version: int = 0
    started_at: datetime | None = None
    ended_at: datetime | None = None
    #: W3C trace context (traceparent, tracestate) of the submitting request.
    trace_carrier: dict[str, str] = field(default_factory=dict)
    #: Where the base model was on disk at submit time, and its sha256 (lineage).
    base_model_path: str = ""
    base_model_sha256: str = ""
    cancel_requested: bool = False
    compute: ComputeSpec = field(default_factory=ComputeSpec)
    #: The scheduler's job running it ("" until it was submitted there), as last seen: its state ("queued",
    #: "running", ...), why it is in it, its queue position while queued (-1 otherwise) and its preemptions.
    scheduler_job_id: str = ""
    scheduler_state: str = ""
    scheduler_reason: str = ""
    queue_position: int = -1
    preemptions: int = 0
    #: How much of the runner's output is relayed into the history: the attempt and the byte offset in its stdout.
    output_attempt: int = 0
    output_offset: int = 0

    @property
    def trace_id(self) -> str:
        parts = self.trace_carrier.get("traceparent", "").split("-")
        return parts[1] if len(parts) == 4 else ""


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's history: kind is state, progress, metrics, log or checkpoint."""

    job_id: str
    sequence: int
    time: datetime
    kind: str
    data: dict[str, Any]


@dataclass(frozen=True)
class ArtifactEntry:
    """A storage artifact a model version (or base model) refers to."""

    role: str
    name: str
    version: int
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ModelRecord:
    tenant: str
    name: str
    latest_version: int
    aliases: dict[str, int]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ModelVersionRecord:
    tenant: str
    model: str
    version: int
    lineage: dict[str, Any]
    metrics: dict[str, Any]
    labels: tuple[str, ...]
    privacy: dict[str, Any] | None
    parity: dict[str, Any]
    int8_quantized: bool
    artifacts: tuple[ArtifactEntry, ...]
    created_at: datetime
    aliases: tuple[str, ...] = ()

    @property
    def total_size_bytes(self) -> int:
        return sum(a.size_bytes for a in self.artifacts)


@dataclass(frozen=True)
class BaseModelRecord:
    """A model fine-tunes start from: built-in (tenant "") or registered by a tenant from an artifact."""

    tenant: str
    name: str
    path: str
    architecture: str
    max_seq_length: int
    parameter_count: int
    sha256: str
    description: str
    created_at: datetime
    artifact: ArtifactEntry | None = None

    @property
    def builtin(self) -> bool:
        return not self.tenant
