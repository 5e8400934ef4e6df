"""Settings of the billing service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.mesh.config import MeshSettings, load_settings

__all__ = ["BillingSettings"]


@dataclass(frozen=True)
class BillingSettings(MeshSettings):
    """MeshSettings; the billing-specific settings arrive with its issue [billing]."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BillingSettings:
        return load_settings(cls, env)
