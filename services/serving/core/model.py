"""Records of the serving service: one deployment per (tenant, model)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import datetime

__all__ = ["DeploymentState", "DeploymentRecord", "SERVING_STATES"]


class DeploymentState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    UPDATING = "updating"
    FAILED = "failed"
    UNLOADING = "unloading"


#: States in which a version is (supposed to be) serving.
SERVING_STATES = frozenset({DeploymentState.READY, DeploymentState.UPDATING})


@dataclass(frozen=True)
class DeploymentRecord:
    """A deployment as stored; changed only through ``replace`` (records are values)."""

    tenant: str
    model: str
    triton_name: str
    state: DeploymentState
    #: Version serving (0: none).
    version: int
    #: Version being rolled out (0: none).
    target_version: int
    #: Alias followed ("" when pinned).
    alias: str
    instance_count: int
    max_batch_size: int
    created_by: str
    create_time: datetime
    update_time: datetime
    last_error: str = ""
    last_error_time: datetime | None = None

    def with_changes(self, now: datetime, **changes: object) -> DeploymentRecord:
        return replace(self, update_time=now, **changes)  # type: ignore[arg-type]

    def failed_with(self, now: datetime, error: str, **changes: object) -> DeploymentRecord:
        return self.with_changes(now, last_error=error, last_error_time=now, **changes)
