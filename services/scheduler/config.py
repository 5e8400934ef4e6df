"""Settings of the scheduler service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.mesh.config import MeshSettings, load_settings

__all__ = ["SchedulerSettings"]


@dataclass(frozen=True)
class SchedulerSettings(MeshSettings):
    """MeshSettings; the scheduler-specific settings arrive with its issue [scheduler]."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SchedulerSettings:
        return load_settings(cls, env)
