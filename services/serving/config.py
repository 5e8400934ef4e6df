"""Settings of the serving service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.mesh.config import MeshSettings, load_settings

__all__ = ["ServingSettings"]


@dataclass(frozen=True)
class ServingSettings(MeshSettings):
    """MeshSettings; the serving-specific settings arrive with its issue [serving]."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServingSettings:
        return load_settings(cls, env)
