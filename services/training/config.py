"""Settings of the training service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.mesh.config import MeshSettings, load_settings

__all__ = ["TrainingSettings"]


@dataclass(frozen=True)
class TrainingSettings(MeshSettings):
    """MeshSettings; the training-specific settings arrive with its issue [training]."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrainingSettings:
        return load_settings(cls, env)
