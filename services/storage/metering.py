"""Storage metering: each tenant's stored bytes integrated over time into billing's ``storage_gib_hours``.

Every tenant has a metering point in the storage database (``storage_metering``): the time up to which its usage
has been emitted, and the volume it holds since. An upload or a delete, and a periodic tick (aligned to multiples
of the interval since the epoch), close the span since the point: its GiB-hours (GiB = 2**30 bytes) are emitted
to the usage outbox as one event, and the point moves to now. Quantities are exact: integer byte-nanoseconds,
rounded half to even to 9 decimals (billing's precision), the rounding residue carried into the next span so that
the emitted total never drifts from the exact integral by more than half a billionth. A span that would round to
zero is not emitted and the point stays put (the volume it held is remembered), so small tenants still accrue.

Exactly once, across crashes and replicas sharing the database:

- An event's id is ``gib-hours:<tenant>:<span start ns>`` and its content follows from the point, so billing
  counts a re-emitted span once (identical: a duplicate) and never twice (different: a rejected conflict).
- A point is saved *before* its span's event is written to the outbox, with the span marked due; the mark is
  cleared after the write. A due span found later (after a crash in between) is emitted again, identically,
  before the point moves on: the span is neither lost nor counted twice.
- Points are saved with compare-and-set, so of two meters closing the same span only one emits it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Protocol

from services.billing.client import usage_event
from services.gen.aidc.billing.v1 import billing_service_pb2 as billing_pb
from services.storage.core.usage import StorageUsage, UsageKind
from services.storage.store import MeteringPoint

__all__ = [
    "StorageMeter",
    "MeteringStore",
    "UsageEventWriter",
    "MeteredSpan",
    "METER",
    "GIB",
    "next_point",
    "gib_hours",
    "span_event_id",
]

log = logging.getLogger(__name__)

#: Billing's meter of stored volume over time.
METER = "storage_gib_hours"
#: Bytes in a GiB.
GIB = 2**30
#: Byte-nanoseconds in one billionth of a GiB-hour (the smallest quantity billing records).
_BYTE_NS_PER_NANO = GIB * 3600
#: Attempts to close a tenant's span when concurrent meters keep moving its point.
_SAVE_ATTEMPTS = 3


class MeteringStore(Protocol):
    """The storage database as the meter uses it (``services.storage.store.StorageStore``); blocking calls."""

    def stored_bytes(self, tenant: str) -> int: ...

    def stored_bytes_by_tenant(self) -> dict[str, int]: ...

    def metering_points(self, tenant: str | None = None) -> list[MeteringPoint]: ...

    def save_metering_points(self, changes: Sequence[tuple[MeteringPoint, MeteringPoint | None]]) -> list[bool]: ...

    def clear_metering_due(self, spans: Sequence[tuple[str, int]]) -> None: ...


class UsageEventWriter(Protocol):
    """Where usage events go: ``services.billing.client.UsageEmitter`` (a durable local write, never a wait for
    billing)."""

    source: str

    def emit_events(self, events: Sequence[billing_pb.UsageEvent]) -> None: ...


@dataclass(frozen=True)
class MeteredSpan:
    """Usage of one tenant over [start_ns, end_ns): ``quantity_nanos`` billionths of a GiB-hour."""

    tenant: str
    start_ns: int
    end_ns: int
    quantity_nanos: int

    @property
    def quantity(self) -> Decimal:
        return gib_hours(self.quantity_nanos)


def gib_hours(quantity_nanos: int) -> Decimal:
    """Billionths of a GiB-hour as an exact Decimal with 9 decimals."""
    return Decimal(quantity_nanos).scaleb(-9)


def span_event_id(tenant: str, start_ns: int) -> str:
    """The usage event id of the tenant's span starting at ``start_ns``: the same for every emission of it."""
    return f"gib-hours:{tenant}:{start_ns}"


def _round_half_even(numerator: int, denominator: int) -> int:
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def next_point(
    point: MeteringPoint | None, tenant: str, now_ns: int, stored_bytes: int
) -> tuple[MeteringPoint | None, MeteredSpan | None]:
    """The tenant's point after observing ``stored_bytes`` at ``now_ns``, and the span to emit (if any).

    Returns (None, None) when nothing needs saving (no accrual worth a billionth and the volume unchanged).
    """
    if point is None:
        return MeteringPoint(tenant, now_ns, now_ns, 0, stored_bytes), None
    now_ns = max(now_ns, point.observed_until_ns)  # a clock stepping back accrues nothing rather than negative
    accrued = point.unbilled_byte_ns + point.stored_bytes * (now_ns - point.observed_until_ns)
    quantity = _round_half_even(accrued, _BYTE_NS_PER_NANO)
    if quantity > 0:
        span = MeteredSpan(tenant, point.metered_until_ns, now_ns, quantity)
        moved = replace(
            point,
            metered_until_ns=now_ns,
            observed_until_ns=now_ns,
            unbilled_byte_ns=accrued - quantity * _BYTE_NS_PER_NANO,
            stored_bytes=stored_bytes,
            due_span_start_ns=span.start_ns,
            due_quantity_nanos=quantity,
            revision=point.revision + 1,
        )
        return moved, span
    if stored_bytes == point.stored_bytes:
        return None, None
    # Too little to bill yet, but the volume changes: remember what the old volume accrued until now.
    held = replace(
        point,
        observed_until_ns=now_ns,
        unbilled_byte_ns=accrued,
        stored_bytes=stored_bytes,
        revision=point.revision + 1,
    )
    return held, None


def _due_span(point: MeteringPoint) -> MeteredSpan | None:
    if point.due_span_start_ns is None or point.due_quantity_nanos is None:
        return None
    return MeteredSpan(point.tenant, point.due_span_start_ns, point.metered_until_ns, point.due_quantity_nanos)


class StorageMeter:
    """A ``UsageSink`` turning uploads, deletes and periodic ticks into ``storage_gib_hours`` usage events.

    ``clock`` gives wall-clock nanoseconds (event times and span bounds); the tick task sleeps in real time.
    """

    def __init__(
        self,
        store: MeteringStore,
        outbox: UsageEventWriter,
        *,
        interval_seconds: float = 3600.0,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError("interval_seconds must be positive")
        self._store = store
        self._outbox = outbox
        self._interval_ns = int(interval_seconds * 1e9)
        self._clock = clock
        # Serializes this meter's steps: a step reads points, saves them and emits in that order.
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resumes from the persisted points (emitting spans a crash left due, and the span since each point, so
        time the service was down is billed at the volume stored meanwhile); tenants storing bytes without a
        point start metering now. Then ticks every interval. Idempotent."""
        if self._task is not None:
            return
        await self.tick()
        self._task = asyncio.create_task(self._run_ticks(), name="storage-metering")

    async def run(self) -> None:
        """What ``start`` does, as one coroutine that ticks until cancelled: the loop the leader of the storage
        replicas runs (uploads and deletes through any replica still close their tenant's span at once)."""
        await self.tick()
        await self._run_ticks()

    async def close(self) -> None:
        """Stops ticking; the points stay persisted and the next start resumes from them."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run_ticks(self) -> None:
        while True:
            now = self._clock()
            await asyncio.sleep(((now // self._interval_ns + 1) * self._interval_ns - now) / 1e9)
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the next tick retries; usage is never lost by a missed tick
                log.warning("storage metering tick failed", exc_info=True)

    # -- metering ----------------------------------------------------------------------------------------

    async def record(self, usage: StorageUsage) -> None:
        """Closes the tenant's span on a volume change. Downloads are not metered: billing has no egress meter."""
        if usage.kind is UsageKind.DOWNLOADED:
            return
        for _ in range(_SAVE_ATTEMPTS):
            if await self._step(usage.tenant):
                return
        log.warning("storage metering of %s kept losing to concurrent meters; the next tick catches up", usage.tenant)

    async def tick(self) -> None:
        """Closes every tenant's span up to now (tenants whose point another meter moved meanwhile are left to
        that meter)."""
        await self._step(None)

    async def _step(self, tenant: str | None) -> bool:
        """One metering step for ``tenant`` (None: every tenant); False if a concurrent meter won a point."""
        async with self._lock:
            # The volume is read here, under the lock, rather than taken from the usage event: reports of
            # concurrent uploads may arrive out of order, the database never is.
            if tenant is None:
                points = await asyncio.to_thread(self._store.metering_points)
                volumes = await asyncio.to_thread(self._store.stored_bytes_by_tenant)
            else:
                points = await asyncio.to_thread(self._store.metering_points, tenant)
                volumes = {tenant: await asyncio.to_thread(self._store.stored_bytes, tenant)}
            by_tenant = {p.tenant: p for p in points}
            now = self._clock()

            # Spans a crash (or a crashed replica) left due go out again first, identically (billing dedups).
            redo = [span for span in map(_due_span, points) if span is not None]
            self._emit(redo)

            changes: list[tuple[MeteringPoint, MeteringPoint | None]] = []
            spans: list[MeteredSpan | None] = []
            for name in sorted(by_tenant.keys() | volumes.keys()):
                new, span = next_point(by_tenant.get(name), name, now, volumes.get(name, 0))
                if new is not None:
                    changes.append((new, by_tenant.get(name)))
                    spans.append(span)
            saved = await asyncio.to_thread(self._store.save_metering_points, changes) if changes else []
            fresh = [span for span, ok in zip(spans, saved, strict=True) if ok and span is not None]
            self._emit(fresh)
            done = [(span.tenant, span.start_ns) for span in (*redo, *fresh)]
            if done:
                await asyncio.to_thread(self._store.clear_metering_due, done)
            return all(saved)

    def _emit(self, spans: Sequence[MeteredSpan]) -> None:
        if not spans:
            return
        self._outbox.emit_events(
            [
                usage_event(
                    source=self._outbox.source,
                    id=span_event_id(span.tenant, span.start_ns),
                    tenant=span.tenant,
                    meter=METER,
                    quantity=span.quantity,
                    # Dated at the span's last instant: a span ending on a window boundary (ticks are aligned)
                    # counts in the window it covers, and no event is ever dated in the future.
                    time_ns=span.end_ns - 1,
                )
                for span in spans
            ]
        )
