"""Metering of allocations: tenants pay for what they hold, like instance-hours. Each admitted job attempt's
allocation is billed from admission to release as cpu_core_seconds, memory_gib_seconds and gpu_seconds (attribute
gpu_type), per node, with attributes pool, node and job, through billing's durable usage outbox.

Exactly once, across crashes: the held time is cut at window boundaries (multiples of the metering interval since
the epoch); a window is emitted when it is complete, or up to the release once the release is stored. Each event's
id names (job, attempt, window, node, meter) and its quantity follows from the stored admission and release times,
so an event emitted again after a crash (before ``metered_until_ns`` was saved) is identical and billing counts it
once. Quantities are exact: integer nanos of the unit, rounded half to even per event (billing's precision).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from typing import Protocol

from services.billing.client import usage_event
from services.gen.aidc.billing.v1 import billing_service_pb2 as billing_pb
from services.scheduler.domain.model import Allocation

__all__ = ["AllocationMeter", "UsageEventWriter", "allocation_events", "event_id", "METERS"]

log = logging.getLogger(__name__)

METERS = ("cpu_core_seconds", "memory_gib_seconds", "gpu_seconds")
_GIB = 2**30


class UsageEventWriter(Protocol):
    """``services.billing.client.UsageEmitter``: a durable local write, never a wait for billing."""

    source: str

    def emit_events(self, events: Sequence[billing_pb.UsageEvent]) -> None: ...


def event_id(job_id: str, attempt: int, window_start_ns: int, node: str, meter: str) -> str:
    return f"alloc:{job_id}:{attempt}:{window_start_ns}:{node}:{meter}"


def _round_half_even(numerator: int, denominator: int) -> int:
    return round(Fraction(numerator, denominator))  # Fraction rounds half to even


def _pieces(start_ns: int, end_ns: int, interval_ns: int) -> list[tuple[int, int, int]]:
    """[start, end) cut at multiples of the interval: (window start, piece start, piece end)."""
    out = []
    at = start_ns
    while at < end_ns:
        window = at - at % interval_ns
        stop = min(window + interval_ns, end_ns)
        out.append((window, at, stop))
        at = stop
    return out


def allocation_events(
    allocation: Allocation, source: str, until_ns: int, interval_ns: int
) -> list[billing_pb.UsageEvent]:
    """The usage events of ``allocation`` from where it was metered until ``until_ns``."""
    start = max(allocation.metered_until_ns, allocation.admitted_ns)
    r = allocation.per_worker
    events = []
    workers_on = Counter(allocation.nodes)
    for window, begin, end in _pieces(start, until_ns, interval_ns):
        held_ns = end - begin
        for node, count in sorted(workers_on.items()):
            # nanos of the unit: core-seconds x 1e9 = millicores x ns / 1000, GiB-seconds x 1e9 = bytes x ns / GiB.
            quantities = {
                "cpu_core_seconds": _round_half_even(count * r.cpu_millicores * held_ns, 1000),
                "memory_gib_seconds": _round_half_even(count * r.memory_bytes * held_ns, _GIB),
                "gpu_seconds": count * r.gpus * held_ns,
            }
            for meter, nanos in quantities.items():
                if nanos <= 0:
                    continue
                attributes = {"pool": allocation.pool, "node": node, "job": allocation.job_id}
                if meter == "gpu_seconds":
                    attributes["gpu_type"] = r.gpu_type
                events.append(
                    usage_event(
                        source=source,
                        id=event_id(allocation.job_id, allocation.attempt, window, node, meter),
                        tenant=allocation.tenant,
                        meter=meter,
                        quantity=Decimal(nanos).scaleb(-9),
                        time_ns=end - 1,
                        attributes=attributes,
                    )
                )
    return events


class AllocationMeter:
    """Meters the open allocations: every complete window at each tick, and up to the release on release."""

    def __init__(
        self,
        outbox: UsageEventWriter,
        save: Callable[[Allocation], Awaitable[None]],
        *,
        interval_seconds: float,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._outbox = outbox
        self._save = save
        self._interval_ns = max(int(interval_seconds * 1e9), 1)
        self._clock = clock
        self._open: dict[tuple[str, int], Allocation] = {}
        self._releasing: set[tuple[str, int]] = set()  # release time decided, not stored yet: ticks leave them alone
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def track(self, allocation: Allocation) -> None:
        self._open[(allocation.job_id, allocation.attempt)] = allocation

    def held(self) -> list[Allocation]:
        return list(self._open.values())

    def latest(self, allocation: Allocation) -> Allocation:
        """``allocation`` metered as far as this meter has metered it (the caller's copy may be older)."""
        tracked = self._open.get((allocation.job_id, allocation.attempt))
        if tracked is None or tracked.metered_until_ns <= allocation.metered_until_ns:
            return allocation
        return replace(allocation, metered_until_ns=tracked.metered_until_ns)

    async def start(self) -> None:
        """Closes what a crash left unmetered (released allocations first), then ticks."""
        await self.tick()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="scheduler-metering")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            now = self._clock()
            await asyncio.sleep(((now // self._interval_ns + 1) * self._interval_ns - now) / 1e9 + 0.01)
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the next tick catches up; nothing is lost by a missed tick
                log.warning("scheduler metering tick failed", exc_info=True)

    async def tick(self) -> None:
        now = self._clock()
        complete = now - now % self._interval_ns
        async with self._lock:
            for key, allocation in list(self._open.items()):
                if key not in self._releasing:
                    await self._meter(key, allocation, allocation.released_ns or complete)

    def releasing(self, allocation: Allocation, ended_ns: int) -> Allocation:
        """``allocation`` (as far as this meter metered it, a tick in progress included) released at ``ended_ns``, or
        where a tick already metered to if that is later: held at least as long as it was metered. Ticks leave it
        alone from now until ``release``: none meters past the release while the caller stores it.

        Synchronous, so that the job scheduler concludes an attempt (its allocation released in the policy, its
        next state decided) in one step of the event loop: a cycle run in between would see an attempt that has
        ended still holding its resources (and preempt for them, or stop it again)."""
        allocation = self.latest(allocation)
        self._releasing.add((allocation.job_id, allocation.attempt))
        return replace(allocation, released_ns=max(ended_ns, allocation.metered_until_ns))

    async def release(self, allocation: Allocation) -> None:
        """``allocation`` from ``releasing``, its release time stored: meters it to the end, from where this meter got
        (the caller's copy may be older), and forgets it."""
        key = (allocation.job_id, allocation.attempt)
        async with self._lock:
            allocation = self.latest(allocation)
            await self._meter(key, allocation, allocation.released_ns)
            self._releasing.discard(key)

    async def _meter(self, key: tuple[str, int], allocation: Allocation, until_ns: int) -> None:
        start = max(allocation.metered_until_ns, allocation.admitted_ns)
        if until_ns > start:
            self._outbox.emit_events(allocation_events(allocation, self._outbox.source, until_ns, self._interval_ns))
        save = until_ns > allocation.metered_until_ns and (until_ns > start or allocation.released_ns)
        if save:
            allocation = replace(allocation, metered_until_ns=until_ns)
        # Known here in the same step as the events are emitted, before the save's await: ``releasing`` reads it.
        if allocation.released_ns and allocation.metered_until_ns >= allocation.released_ns:
            self._open.pop(key, None)
        else:
            self._open[key] = allocation
        if save:
            await self._save(allocation)
