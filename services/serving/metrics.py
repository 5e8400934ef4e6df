"""The serving service's own figures: inferences and their latency per deployed model, refusals (rate limit,
budget) per tenant, and Triton's: whether it answers, and its per-model statistics relayed under the names of
Triton's own /metrics (``nv_inference_*``), so the same rules and dashboards work where Prometheus scrapes Triton
directly. They are read from Triton's ModelStatistics over the gateway's mutual-TLS channel: Triton's plain-HTTP
metrics port, readable by any local user, stays off.

Label values are bounded: tenants and models only of authorized requests to deployed models (a refusal before the
route is known has no tenant label), Triton's models are the deployments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

import tritonclient.grpc.service_pb2 as spb
from prometheus_client import Counter, Gauge, Histogram

from services.mesh.metrics import LATENCY_BUCKETS, Figure, ScrapedFigures, child
from services.serving.routes import Route

__all__ = ["GatewayMetrics", "TritonMetricsRelay", "TRITON_FIGURES"]

log = logging.getLogger(__name__)

INFERENCES = Counter("aidc_gateway_inferences", "Inference requests served, per tenant and model.", ["tenant", "model"])
LATENCY = Histogram(
    "aidc_gateway_inference_seconds",
    "Time Triton took to answer a forwarded inference request, per tenant and model.",
    ["tenant", "model"],
    buckets=LATENCY_BUCKETS,
)
REFUSALS = Counter(
    "aidc_gateway_refusals", "Inference requests refused by a tenant's rate limit or budget.", ["tenant", "reason"]
)
TRITON_UP = Gauge("aidc_serving_triton_up", "1 while Triton answers the gateway's statistics requests, else 0.")

#: Triton's own metric names (its /metrics), each from one ModelStatistics field: (name, help, field, per).
_RELAYED = (
    ("nv_inference_request_success", "Successful inference requests.", "success", "count"),
    ("nv_inference_request_failure", "Failed inference requests.", "fail", "count"),
    ("nv_inference_request_duration_us", "Cumulative inference request duration (us).", "success", "us"),
    ("nv_inference_queue_duration_us", "Cumulative time requests spent queued (us).", "queue", "us"),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration (us).", "compute_input", "us"),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration (us).", "compute_infer", "us"),
    ("nv_inference_compute_output_duration_us", "Cumulative compute output duration (us).", "compute_output", "us"),
)
TRITON_FIGURES = ScrapedFigures(
    *(
        (
            ("untyped", name, f"{doc} Relayed from Triton's statistics.", ("model", "version"))
            for name, doc, *_ in _RELAYED
        )
    ),
    ("untyped", "nv_inference_count", "Inferences performed (a batch counts each). Relayed.", ("model", "version")),
    ("untyped", "nv_inference_exec_count", "Model executions (batches). Relayed.", ("model", "version")),
)


class GatewayMetrics:
    """Pre-bound children per route (no-ops with metrics off): a served request costs a dict lookup and two
    updates, no label handling."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._routes: dict[Route, tuple[Any, Any]] = {}

    def served(self, route: Route, took_ns: int) -> None:
        bound = self._routes.get(route)
        if bound is None:
            if len(self._routes) > 10_000:  # routes of undeployed versions are not kept forever
                self._routes.clear()
            bound = self._routes[route] = (
                child(self.enabled, INFERENCES, route.tenant, route.model),
                child(self.enabled, LATENCY, route.tenant, route.model),
            )
        bound[0].inc()
        bound[1].observe(took_ns / 1e9)

    def refused(self, tenant: str, reason: str) -> None:
        child(self.enabled, REFUSALS, tenant, reason).inc()


class StatisticsReader(Protocol):
    async def everything(self) -> spb.ModelStatisticsResponse: ...


class TritonMetricsRelay:
    """Reads all of Triton's model statistics every ``interval`` seconds into the figures scrapes report (unless
    ``relay`` is off), and whether Triton answered. The loop runs on the gateway's event loop; scrapes read the last
    snapshot."""

    def __init__(
        self, statistics: StatisticsReader, interval_seconds: float = 5.0, enabled: bool = True, relay: bool = True
    ) -> None:
        self._statistics = statistics
        self._interval = interval_seconds
        self._enabled = enabled
        self._relay = relay
        self._snapshot: list[Figure] = []
        self._task: asyncio.Task[None] | None = None
        self._detach = lambda: None

    def start(self) -> None:
        if not self._enabled or self._task is not None:
            return
        if self._relay:
            self._detach = TRITON_FIGURES.attach(lambda: self._snapshot)
        self._task = asyncio.create_task(self._run(), name="triton-metrics")

    async def refresh(self) -> None:
        """Reads Triton's statistics once."""
        try:
            response = await self._statistics.everything()
        except Exception as exc:  # noqa: BLE001 - Triton down or restarting: the gauge says so, the figures go
            log.debug("Triton statistics unavailable: %s", exc)
            TRITON_UP.set(0)
            self._snapshot = []
            return
        TRITON_UP.set(1)
        self._snapshot = _figures(response)

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval)

    async def close(self) -> None:
        self._detach()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _figures(response: spb.ModelStatisticsResponse) -> list[Figure]:
    figures: list[Figure] = []
    for stats in response.model_stats:
        labels = (stats.name, stats.version)
        for name, _, field, unit in _RELAYED:
            duration = getattr(stats.inference_stats, field)
            figures.append((name, labels, float(duration.count if unit == "count" else duration.ns // 1000)))
        figures.append(("nv_inference_count", labels, float(stats.inference_count)))
        figures.append(("nv_inference_exec_count", labels, float(stats.execution_count)))
    return figures
