"""Settings of the storage service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.mesh.config import MeshSettings, load_settings

__all__ = ["StorageSettings"]


@dataclass(frozen=True)
class StorageSettings(MeshSettings):
    """MeshSettings; the storage-specific settings arrive with its issue [storage]."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StorageSettings:
        return load_settings(cls, env)
