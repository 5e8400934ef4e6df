"""Usage metering of inference: one ``inference_requests`` event per served request, and each request's share of
the model compute time Triton reports, as ``inference_compute_ms``.

Triton's python backend cannot return a request's compute time, so the meter reads it from Triton's statistics:
every interval it reads the cumulative execution time of each (model, version) that served requests in the window
and splits the increase over that window's requests in proportion to their round-trip times. The billed total is
therefore exactly what Triton reports. It is the time of the model's executions (``batch_stats``), counted once
per batch: Triton's per-request figures count a batch's time once for every request in it.

A (model, version)'s baseline is read before the gateway first forwards a request to it, so inferences the gateway
did not forward (the deployer's probes) are never billed. A Triton restart resets its counters: the gateway forgets
its baselines when Triton becomes unreachable, and a reading below its baseline counts from zero. Compute time
Triton spent on requests of a window that ended with Triton down is lost (never billed twice), and so is the last
window of a gateway that crashes (requests are metered at the end of each window, not one by one).

A window's compute is billed once Triton has counted at least as many requests since the last billed reading as the
window holds; a request Triton counted that the gateway records only later (its answer still on the way when the
statistics were read) counts toward the next window, which it is billed in. So a reading never takes a count from a
later window: that window would otherwise wait for a request Triton had already counted, and every later window of
the model with it. The compute time of such a request's execution is billed with the window whose reading saw it.
The wait is bounded all the same (MAX_COUNT_WAIT_SECONDS): a count that never comes (e.g. requests recorded just
before Triton restarted, whose counts went with it) ends the wait, and the window is billed what Triton reported.

This relies on one gateway per Triton: gateways sharing a Triton would each bill the other's compute time.

Request ids are UUIDv7 (time-ordered, which billing ingests fastest): "<uuid>" for the request, "<uuid>/compute" for
its compute time. They are made once, before the events enter the durable outbox, so redelivery never
double-counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import tritonclient.grpc.service_pb2 as spb

from services.billing.client import new_event_id, usage_event
from services.gen.aidc.billing.v1 import billing_service_pb2 as billing_pb
from services.serving.routes import Route

__all__ = [
    "MAX_COUNT_WAIT_SECONDS",
    "ComputeReading",
    "StatisticsSource",
    "TritonStatistics",
    "UsageSink",
    "InferenceMeter",
    "split",
]

log = logging.getLogger(__name__)

REQUESTS_METER = "inference_requests"
COMPUTE_METER = "inference_compute_ms"
_MAX_UNATTRIBUTED = 1_000_000
#: How long a window waits for Triton to count its requests (it takes milliseconds when the counts can come at all).
MAX_COUNT_WAIT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class ComputeReading:
    """Cumulative counters of one loaded (model, version) in Triton: successful requests and compute time."""

    requests: int
    compute_ns: int


class StatisticsSource(Protocol):
    async def read(self, model: str, version: str) -> ComputeReading:
        """The counters now; raises when Triton or the model is unavailable."""
        ...


class UsageSink(Protocol):
    """Where events go (billing's UsageEmitter: a durable outbox, delivered in batches)."""

    source: str

    def emit_events(self, events: Sequence[billing_pb.UsageEvent]) -> None: ...

    async def start(self) -> None: ...

    async def close(self, flush_timeout: float = 5.0) -> None: ...


class TritonStatistics:
    """Reads ModelStatistics from Triton over the gateway's channel (with Triton's access ``metadata``)."""

    def __init__(
        self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = (), timeout_seconds: float = 5.0
    ) -> None:
        self._call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelStatistics",
            request_serializer=spb.ModelStatisticsRequest.SerializeToString,
            response_deserializer=spb.ModelStatisticsResponse.FromString,
        )
        self._metadata = metadata
        self._timeout = timeout_seconds

    async def everything(self) -> spb.ModelStatisticsResponse:
        """The statistics of every model Triton has loaded (for the metrics relay)."""
        response: spb.ModelStatisticsResponse = await self._call(
            spb.ModelStatisticsRequest(), timeout=self._timeout, metadata=self._metadata
        )
        return response

    async def read(self, model: str, version: str) -> ComputeReading:
        request = spb.ModelStatisticsRequest(name=model, version=version)
        response = await self._call(request, timeout=self._timeout, metadata=self._metadata)
        for stats in response.model_stats:
            if stats.version == version:
                compute = sum(b.compute_input.ns + b.compute_infer.ns + b.compute_output.ns for b in stats.batch_stats)
                return ComputeReading(stats.inference_stats.success.count, compute)
        raise LookupError(f"Triton has no statistics for {model} version {version}")


def split(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` (each >= 1) into integers that add up to exactly ``total``."""
    whole = sum(weights)
    shares = [total * w // whole for w in weights]
    for i in range(total - sum(shares)):  # fewer than len(weights) units are left over
        shares[i] += 1
    return shares


def _milliseconds(ns: int) -> str:
    return f"{ns // 1_000_000}.{ns % 1_000_000:06d}"


# One served request: its route, wall-clock start, round-trip time and trace id (0: not traced).
_Served = tuple[Route, int, int, int]


class InferenceMeter:
    """Turns served requests into usage events; ``record`` is all the request path does (an append)."""

    def __init__(
        self,
        sink: UsageSink,
        statistics: StatisticsSource,
        interval_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self._statistics = statistics
        self._interval = interval_seconds
        self._clock = clock
        # Since when each (model, version) with requests waiting has waited for Triton to count them.
        self._waiting_since: dict[Route, float] = {}
        self._window: list[_Served] = []
        self._baselines: dict[Route, ComputeReading] = {}
        self._baseline_reads: dict[Route, asyncio.Task[None]] = {}
        # Requests whose compute share is not known yet (their model's statistics could not be read).
        self._unattributed: dict[Route, list[tuple[str, _Served]]] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # -- the request path ------------------------------------------------------------------------------

    def has_baseline(self, route: Route) -> bool:
        return route in self._baselines

    async def take_baseline(self, route: Route) -> None:
        """Reads the counters of a (model, version) before its first request is forwarded (once, shared)."""
        task = self._baseline_reads.get(route)
        if task is None:
            task = self._baseline_reads[route] = asyncio.create_task(self._read_baseline(route))
        await asyncio.shield(task)

    async def _read_baseline(self, route: Route) -> None:
        try:
            self._baselines[route] = await self._statistics.read(route.triton_name, route.version)
        except Exception as exc:  # noqa: BLE001 - the request goes on; its window's compute stays unbilled
            log.warning("no compute baseline for %s version %s: %s", route.triton_name, route.version, exc)
        finally:
            self._baseline_reads.pop(route, None)

    def forget_baselines(self) -> None:
        """Triton was unreachable (it may restart with fresh counters): read baselines again before forwarding."""
        self._baselines.clear()

    def record(self, route: Route, started_ns: int, round_trip_ns: int, trace_id: int) -> None:
        """One request served by ``route``: metered at the end of the current window."""
        self._window.append((route, started_ns, round_trip_ns, trace_id))

    def unattributed(self) -> int:
        """Requests metered whose compute share is not known yet (waiting for Triton's statistics)."""
        return sum(len(served) for served in self._unattributed.values())

    # -- the metering loop -----------------------------------------------------------------------------

    async def start(self, deliver: bool = True) -> None:
        """Starts the metering loop; with ``deliver``, also the outbox's delivery to billing (which takes usage only
        from a mesh certificate: without one, events wait in the outbox)."""
        if deliver:
            await self.sink.start()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="inference-meter")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - a failed window must not stop metering
                log.exception("inference metering failed for one window")

    async def flush(self) -> None:
        """Meters every request recorded so far (the loop does this every interval)."""
        async with self._lock:
            window, self._window = self._window, []
            events = []
            for served in window:
                request_id = new_event_id(served[1])
                events.append(self._event(served, request_id, REQUESTS_METER, "1"))
                self._unattributed.setdefault(served[0], []).append((request_id, served))
            readings = await self._read_all(list(self._unattributed))
            for route, reading in readings.items():
                events += self._compute_events(route, reading)
            if events:
                self.sink.emit_events(events)

    async def _read_all(self, routes: list[Route]) -> dict[Route, ComputeReading]:
        results = await asyncio.gather(
            *(self._statistics.read(r.triton_name, r.version) for r in routes), return_exceptions=True
        )
        readings: dict[Route, ComputeReading] = {}
        for route, result in zip(routes, results, strict=True):
            if isinstance(result, ComputeReading):
                readings[route] = result
            elif len(self._unattributed[route]) > _MAX_UNATTRIBUTED:
                log.error("the compute time of %d requests to %s is lost: %s", _MAX_UNATTRIBUTED, route, result)
                del self._unattributed[route]
                self._waiting_since.pop(route, None)
        return readings

    def _compute_events(self, route: Route, reading: ComputeReading) -> list[billing_pb.UsageEvent]:
        """The compute increase of one (model, version) since its last reading, split over the requests served
        since then in proportion to their round-trip times."""
        served = self._unattributed[route]
        baseline = self._baselines.get(route)
        restarted = baseline is not None and (
            reading.compute_ns < baseline.compute_ns or reading.requests < baseline.requests
        )
        counted = len(served) if baseline is None or restarted else reading.requests - baseline.requests
        if counted < len(served):
            # Triton updates its statistics just after it answers: the latest requests are not counted yet, so
            # their compute waits for the next window rather than being billed to nobody.
            since = self._waiting_since.setdefault(route, self._clock())
            if self._clock() - since < MAX_COUNT_WAIT_SECONDS:
                return []
            log.warning(
                "Triton counted %d of %d requests to %s in %.0f s; billing them the compute it reported",
                counted,
                len(served),
                route.triton_name,
                self._clock() - since,
            )
        del self._unattributed[route]
        self._waiting_since.pop(route, None)
        if baseline is None or restarted or counted < len(served):
            self._baselines[route] = reading
        else:  # the requests counted beyond this window's are later windows' (recorded after this reading)
            self._baselines[route] = ComputeReading(baseline.requests + len(served), reading.compute_ns)
        if baseline is None:
            log.info("compute of %d requests to %s is not billed: no baseline", len(served), route.triton_name)
            return []
        increase = reading.compute_ns if restarted else reading.compute_ns - baseline.compute_ns
        shares = split(increase, [max(s[2], 1) for _, s in served])
        return [
            self._event(s, f"{request_id}/compute", COMPUTE_METER, _milliseconds(share))
            for (request_id, s), share in zip(served, shares, strict=True)
            if share
        ]

    def _event(self, served: _Served, event_id: str, meter: str, quantity: str) -> billing_pb.UsageEvent:
        route, started_ns, _, trace_id = served
        attributes = {"model": route.model, "model_version": route.version}
        if trace_id:
            attributes["trace_id"] = format(trace_id, "032x")
        return usage_event(
            source=self.sink.source,
            id=event_id,
            tenant=route.tenant,
            meter=meter,
            quantity=quantity,
            time_ns=started_ns,
            attributes=attributes,
        )

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Stops the loop, meters what is left, and closes the sink (which tries to deliver it for
        ``flush_timeout`` seconds)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()
        reads = list(self._baseline_reads.values())
        for task in reads:
            task.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        await self.sink.close(flush_timeout)
