"""Prometheus metrics, one way for every service: the RPC metrics interceptor, the /metrics endpoint (mutual TLS
like the mesh itself), and ``ScrapedFigures`` for figures read when scraped (a table's counts, a queue's age).

RPC metrics use the names of the field's gRPC exporters (go-grpc-prometheus, py-grpc-prometheus), so standard
dashboards and rules apply::

    grpc_server_handled_total{grpc_service, grpc_method, grpc_type, grpc_code}   RPCs finished, by status code
    grpc_server_handling_seconds{grpc_service, grpc_method, grpc_type}           latency histogram
    grpc_server_in_flight{grpc_service, grpc_method}                              RPCs being served now

Labels stay bounded: only methods the server serves get their own label values; any other method name a caller
sends is counted under ``grpc_service="unknown", grpc_method="unknown"`` (UNIMPLEMENTED). The service itself is
Prometheus's ``job`` label. Each RPC costs a few pre-bound child updates (no label lookup, no dict built per call).

Domain figures live with each service (``services/<svc>/metrics.py``), named ``aidc_<svc>_*``. Metrics are
process-wide (prometheus_client's default registry): a service is one process. ``AIDC_METRICS_ADDR=off`` records
nothing at all (no interceptor, no-op children), which is how the hot-path benchmark measures their cost.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc.aio import ServicerContext
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric, UnknownMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from services.mesh.config import MeshSettings, parse_address
from services.mesh.interceptors import Behavior, _WrappingInterceptor

__all__ = [
    "LATENCY_BUCKETS",
    "RPC_HANDLED",
    "RPC_SECONDS",
    "RPC_IN_FLIGHT",
    "MetricsInterceptor",
    "MetricsEndpoint",
    "ScrapedFigures",
    "Figure",
    "NOOP",
    "metrics_enabled",
    "child",
    "exported_names",
    "Scrape",
    "scrape",
]

log = logging.getLogger(__name__)

# No `*_created` series beside every counter and histogram: they double the series and no rule uses them.
disable_created_metrics()

#: Seconds; 0.5 s is the latency objective's bound in the alert rules, so it must stay a bucket edge.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_UNKNOWN = "unknown"

RPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
)
RPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC on the server to its end (a whole stream for streaming RPCs).",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=LATENCY_BUCKETS,
)
RPC_IN_FLIGHT = Gauge("grpc_server_in_flight", "RPCs being served now.", ["grpc_service", "grpc_method"])


def metrics_enabled(settings: MeshSettings) -> bool:
    """Whether this process records metrics (``AIDC_METRICS_ADDR`` is not ``off``)."""
    return settings.metrics_addr != "off"


class _Noop:
    """A metric child that records nothing (metrics switched off)."""

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


NOOP: Any = _Noop()


def child(enabled: bool, metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)`` bound once (callers keep it), or a no-op child when metrics are off."""
    if not enabled:
        return NOOP
    return metric.labels(*labels) if labels else metric


_RPC_TYPES = {(False, False): "unary", (False, True): "server_stream", (True, False): "client_stream"}


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service or _UNKNOWN, name or _UNKNOWN


class MetricsInterceptor(_WrappingInterceptor):
    """Counts, times and tracks in flight every RPC the server serves; outermost, so it sees every other
    interceptor's refusals (UNAUTHENTICATED, PERMISSION_DENIED, ...) with their codes."""

    def __init__(self) -> None:
        self._unknown = RPC_HANDLED.labels(_UNKNOWN, _UNKNOWN, _UNKNOWN, grpc.StatusCode.UNIMPLEMENTED.name)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await super().intercept_service(continuation, handler_call_details)
        if handler is None:  # not served: gRPC answers UNIMPLEMENTED; the name a caller made up is no label
            self._unknown.inc()
        return handler

    def decorate(
        self,
        behavior: Behavior,
        request_streaming: bool,
        response_streaming: bool,
        details: grpc.HandlerCallDetails,
    ) -> Behavior:
        service, method = _split(details.method)
        kind = _RPC_TYPES.get((request_streaming, response_streaming), "bidi_stream")
        seconds = RPC_SECONDS.labels(service, method, kind)
        in_flight = RPC_IN_FLIGHT.labels(service, method)
        handled: dict[grpc.StatusCode, Any] = {}

        def finished(code: grpc.StatusCode, started: float) -> None:
            in_flight.dec()
            seconds.observe(time.perf_counter() - started)
            counter = handled.get(code)
            if counter is None:  # at most one per status code
                counter = handled[code] = RPC_HANDLED.labels(service, method, kind, code.name)
            counter.inc()

        def code_of(error: BaseException, context: ServicerContext) -> grpc.StatusCode:
            if isinstance(error, grpc.aio.AbortError):
                return context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[no-any-return]
            if not isinstance(error, Exception):
                return grpc.StatusCode.CANCELLED  # the caller went away (CancelledError, GeneratorExit)
            return grpc.StatusCode.UNKNOWN

        ok = grpc.StatusCode.OK
        perf_counter = time.perf_counter
        if response_streaming:

            async def streaming(request: Any, context: ServicerContext) -> AsyncIterator[Any]:
                in_flight.inc()
                started = perf_counter()
                code = ok
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as error:
                    code = code_of(error, context)
                    raise
                finally:
                    finished(code, started)

            return streaming

        async def unary(request: Any, context: ServicerContext) -> Any:
            in_flight.inc()
            started = perf_counter()
            code = ok
            try:
                return await behavior(request, context)
            except BaseException as error:
                code = code_of(error, context)
                raise
            finally:
                finished(code, started)

        return unary


class MetricsEndpoint:
    """The process's /metrics over HTTP(S) in a background thread: with the mesh's certificates, TLS with the
    service's certificate and (``AIDC_CLIENT_AUTH=require``) a client certificate of the mesh's CA required, so only
    the operator's tools and Prometheus (its client certificate from ``aidc certs``/``aidc up``) read it."""

    def __init__(
        self,
        address: str,
        tls_dir: Path | None,
        identity: str,
        *,
        require_client_cert: bool = True,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.address = address
        self._tls_dir = tls_dir
        self._identity = identity
        self._require = require_client_cert
        self._registry = registry
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def scheme(self) -> str:
        return "http" if self._tls_dir is None else "https"

    def start(self) -> int:
        """Binds and serves; returns the bound port (a configured port 0 picks a free one)."""
        host, port = parse_address(self.address)
        tls: dict[str, Any] = {}
        if self._tls_dir is not None:
            tls = {
                "certfile": str(self._tls_dir / f"{self._identity}.pem"),
                "keyfile": str(self._tls_dir / f"{self._identity}-key.pem"),
                "client_cafile": str(self._tls_dir / "ca.pem"),
                "client_auth_required": self._require,
                "tls_min_version": ssl.TLSVersion.TLSv1_2,
            }
        self._server, self._thread = start_http_server(port, host, self._registry, **tls)
        self.port = int(self._server.server_port)
        log.info("metrics at %s://%s:%d/metrics", self.scheme, host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


#: One figure read at scrape time: (family name, label values, value).
Figure = tuple[str, tuple[str, ...], float]


class ScrapedFigures(Collector):
    """Metric families whose values are read when scraped (a database's counts, an outbox's oldest event), from
    every reader attached: a service attaches one when it starts and detaches it when it stops.

    ``families`` are (kind, name, help, label names) with kind "gauge", "counter" (``name`` without ``_total``) or
    "untyped" (names kept exactly as given, e.g. Triton's own). A reader that fails is logged and skipped: a scrape
    never fails because one figure could not be read.
    """

    def __init__(
        self, *families: tuple[str, str, str, tuple[str, ...]], registry: CollectorRegistry | None = REGISTRY
    ) -> None:
        self._families = families
        self._readers: list[Callable[[], Iterable[Figure]]] = []
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def attach(self, reader: Callable[[], Iterable[Figure]]) -> Callable[[], None]:
        """Adds a reader; returns the function that removes it."""
        with self._lock:
            self._readers.append(reader)

        def detach() -> None:
            with self._lock:
                if reader in self._readers:
                    self._readers.remove(reader)

        return detach

    def _empty(self) -> dict[str, Metric]:
        out: dict[str, Metric] = {}
        for kind, name, documentation, labels in self._families:
            family: Metric
            if kind == "gauge":
                family = GaugeMetricFamily(name, documentation, labels=labels)
            elif kind == "counter":
                family = CounterMetricFamily(name, documentation, labels=labels)
            else:
                family = UnknownMetricFamily(name, documentation, labels=labels)
            out[name] = family
        return out

    def describe(self) -> Iterator[Metric]:
        return iter(self._empty().values())

    def collect(self) -> Iterator[Metric]:
        families = self._empty()
        with self._lock:
            readers = list(self._readers)
        for reader in readers:
            try:
                figures = list(reader())
            except Exception:  # noqa: BLE001 - one unreadable source must not fail the whole scrape
                log.warning("could not read figures for a scrape", exc_info=True)
                continue
            for name, labels, value in figures:
                families[name].add_metric(list(labels), value)  # type: ignore[attr-defined]
        return iter(families.values())


def exported_names(registry: CollectorRegistry = REGISTRY) -> set[str]:
    """Every sample name the registry can export (``x_total``, ``x_bucket``, ...), whether or not it has samples yet:
    what dashboards and alert rules may name."""
    names: set[str] = set()
    for collector in list(registry._collector_to_names):  # noqa: SLF001 - the registry keeps no public index
        describe = getattr(collector, "describe", None)
        for family in describe() if describe is not None else collector.collect():
            names.update(_sample_names(family))
    return names


def _sample_names(family: Metric) -> set[str]:
    name = family.name
    if family.type == "counter":
        return {f"{name}_total"}
    if family.type == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if family.type == "summary":
        return {name, f"{name}_sum", f"{name}_count"}
    if family.type == "info":
        return {f"{name}_info"}
    return {name}


class Scrape:
    """One scrape's samples by sample name: ``value(name, **labels)`` sums the samples whose labels match."""

    def __init__(self, text: str) -> None:
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples carrying ``labels`` (0 when there are none)."""
        return sum(
            value
            for have, value in self.samples.get(name, ())
            if all(have.get(key) == wanted for key, wanted in labels.items())
        )

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return list(self.samples.get(name, ()))


#: Scrapes go straight to the endpoint: an HTTP(S)_PROXY from the environment must not catch loopback URLs.
_NO_PROXY = urllib.request.ProxyHandler({})


def scrape(url: str, tls_dir: Path | None = None, identity: str = "cli", timeout: float = 5.0) -> Scrape:
    """GETs a /metrics URL; for https, trusting the mesh's CA in ``tls_dir`` and presenting ``identity``'s client
    certificate from there."""
    handlers: list[Any] = [_NO_PROXY]
    if url.startswith("https://"):
        if tls_dir is None:
            raise ValueError(f"{url} needs the mesh's certificates")
        context = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
        context.load_cert_chain(str(tls_dir / f"{identity}.pem"), str(tls_dir / f"{identity}-key.pem"))
        handlers.append(urllib.request.HTTPSHandler(context=context))
    with urllib.request.build_opener(*handlers).open(url, timeout=timeout) as response:
        return Scrape(response.read().decode())
