"""The storage service's own figures: bytes moved per tenant and direction (their rate is stream throughput), and
each tenant's stored bytes and object versions, read from the database when scraped.

Tenant labels are bounded: only authorized requests move bytes, and tenants are created by platform admins."""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import Counter

from services.mesh.metrics import Figure, ScrapedFigures, child
from services.storage.core.usage import StorageUsage, UsageKind, UsageSink

__all__ = ["StorageMetrics", "Holdings"]

TRANSFERRED = Counter(
    "aidc_storage_transfer_bytes",
    "Plaintext bytes uploaded (stored), downloaded or deleted, per tenant.",
    ["tenant", "direction"],
)
HOLDINGS = ScrapedFigures(
    (
        "gauge",
        "aidc_storage_stored_bytes",
        "Bytes a tenant stores (encrypted, as held in the object store).",
        ("tenant",),
    ),
    ("gauge", "aidc_storage_objects", "Object versions (datasets and artifacts) a tenant stores.", ("tenant",)),
)
_DIRECTIONS = {UsageKind.STORED: "upload", UsageKind.DOWNLOADED: "download", UsageKind.DELETED: "delete"}


class Holdings(Protocol):
    def holdings_by_tenant(self) -> dict[str, tuple[int, int]]: ...


class StorageMetrics(UsageSink):
    """Counts every transfer the core reports, then hands the event on to ``inner`` (the meter)."""

    def __init__(self, inner: UsageSink, enabled: bool = True) -> None:
        self._inner = inner
        self._enabled = enabled
        self._transferred: dict[tuple[str, UsageKind], Any] = {}
        self._detach = lambda: None

    def watch(self, store: Holdings) -> None:
        """Reports ``store``'s holdings per tenant at every scrape, until ``close``."""
        if not self._enabled:
            return

        def read() -> list[Figure]:
            figures: list[Figure] = []
            for tenant, (stored, objects) in store.holdings_by_tenant().items():
                figures.append(("aidc_storage_stored_bytes", (tenant,), float(stored)))
                figures.append(("aidc_storage_objects", (tenant,), float(objects)))
            return figures

        self._detach = HOLDINGS.attach(read)

    async def record(self, usage: StorageUsage) -> None:
        key = (usage.tenant, usage.kind)
        counter = self._transferred.get(key)
        if counter is None:
            counter = self._transferred[key] = child(self._enabled, TRANSFERRED, usage.tenant, _DIRECTIONS[usage.kind])
        counter.inc(usage.bytes)
        await self._inner.record(usage)

    def close(self) -> None:
        self._detach()
