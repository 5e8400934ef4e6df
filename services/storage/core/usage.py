"""The hook through which storage reports usage (bytes stored, deleted and downloaded per tenant) to billing.

The service wires in ``services.storage.metering.StorageMeter``, which turns these events into billing's
storage_gib_hours; ``NoUsageSink`` is the default of a bare ``StorageCore``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

__all__ = ["UsageKind", "StorageUsage", "UsageSink", "NoUsageSink"]


class UsageKind(enum.Enum):
    STORED = "stored"
    DELETED = "deleted"
    DOWNLOADED = "downloaded"


@dataclass(frozen=True)
class StorageUsage:
    """One usage event; ``total_stored_bytes`` is the tenant's stored volume right after it (billing integrates
    it over time into byte-hours)."""

    event_id: str
    tenant: str
    kind: UsageKind
    bytes: int
    total_stored_bytes: int | None  # None for downloads: they do not change it, and it is not looked up for them
    at: datetime


class UsageSink(Protocol):
    """Receives usage events; must not raise for billing outages (buffer and retry instead)."""

    async def record(self, usage: StorageUsage) -> None: ...


class NoUsageSink:
    """Discards usage events (a StorageCore built without a sink)."""

    async def record(self, usage: StorageUsage) -> None:
        return None
