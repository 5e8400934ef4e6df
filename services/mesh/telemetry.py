"""OpenTelemetry tracing for every process of the mesh: one ``init_telemetry`` call at startup.

Spans go to an OTLP backend when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set, and
otherwise to the local span store (``<data_dir>/traces/<service>-<pid>.jsonl``, read by ``aidc trace``).
Context propagates as W3C tracecontext + baggage, the same headers Triton honours.

Several services may run in one process (tests, ``aidc up --in-process``). OpenTelemetry allows the global
tracer provider to be set only once, and tracers handed out earlier keep pointing at it, so:

* the first call creates the provider; its Resource (``service.name``) is the first caller's and stays so for
  the life of the process: spans of later services in the same process carry the first service's name;
* later calls return that same provider. If they ask for the same destination (same OTLP endpoint, or the same
  traces directory) nothing changes; if they ask for a different one, the previous exporter is flushed and
  shut down and spans go to the new destination from then on (the last call wins). That keeps each test's
  spans in its own temp directory;
* ``shutdown_telemetry()`` flushes and closes the exporter; the provider stays installed (exporting nothing)
  until the next ``init_telemetry``;
* if something else already installed an SDK ``TracerProvider`` globally, it is used (with a warning) rather
  than creating one no tracer would see.

The sampler is the SDK's (``OTEL_TRACES_SAMPLER`` from the process environment; default parent-based
always-on).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.mesh.config import Setting
from services.mesh.spanstore import SpanStoreExporter, store_file, traces_dir

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan, Span

__all__ = [
    "DEFAULT_STORE_SCHEDULE_DELAY_MS",
    "TELEMETRY_VARIABLES",
    "export_environment",
    "init_telemetry",
    "shutdown_telemetry",
    "tracer",
]

_log = logging.getLogger(__name__)

#: Batch delay for the local span store: short, so ``aidc trace`` sees a request's spans right after it.
DEFAULT_STORE_SCHEDULE_DELAY_MS = 200
_PROTOCOLS = ("grpc", "http/protobuf")

#: The standard OpenTelemetry variables init_telemetry reads (documented in the README via `aidc config`).
TELEMETRY_VARIABLES: tuple[Setting, ...] = (
    Setting("OTEL_EXPORTER_OTLP_ENDPOINT", "", "OTLP endpoint for spans; empty: local span store <data_dir>/traces."),
    Setting("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "", "Traces-only OTLP endpoint, used exactly as given."),
    Setting("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "OTLP protocol: grpc or http/protobuf."),
    Setting("OTEL_EXPORTER_OTLP_HEADERS", "", "Extra OTLP headers, key=value,key=value."),
    Setting("OTEL_BSP_SCHEDULE_DELAY", "200", "Span batch delay in ms (200 for the span store; SDK default for OTLP)."),
    Setting("OTEL_RESOURCE_ATTRIBUTES", "", "Extra resource attributes; service.name is set per service."),
)
_FLUSH_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class _Destination:
    """Where spans are exported; two equal destinations mean a later init call changes nothing."""

    kind: str  # "otlp" or "store"
    target: str  # endpoint URL, or the traces directory
    protocol: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    schedule_delay_ms: float | None = None
    # Names the store file; services sharing a process and a directory share the first one's file.
    service_name: str = field(default="", compare=False)


class _SwappableSpanProcessor(SpanProcessor):
    """Forwards to one replaceable delegate: the SDK can add span processors but never remove them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._delegate: SpanProcessor | None = None

    def swap(self, delegate: SpanProcessor | None) -> SpanProcessor | None:
        """Installs a new delegate (or none) and returns the previous one, which the caller shuts down."""
        with self._lock:
            previous, self._delegate = self._delegate, delegate
        return previous

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        delegate = self._delegate
        if delegate is not None:
            delegate.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        delegate = self._delegate
        if delegate is not None:
            delegate.on_end(span)

    def shutdown(self) -> None:
        previous = self.swap(None)
        if previous is not None:
            previous.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        delegate = self._delegate
        return delegate.force_flush(timeout_millis) if delegate is not None else True


@dataclass
class _Telemetry:
    provider: TracerProvider
    processor: _SwappableSpanProcessor
    service_name: str
    destination: _Destination | None


_state_lock = threading.Lock()
_state: _Telemetry | None = None


def init_telemetry(service_name: str, data_dir: Path, env: Mapping[str, str] = os.environ) -> TracerProvider:
    """Installs tracing for this process and returns the global tracer provider.

    Reads ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (unset: local span store),
    ``OTEL_EXPORTER_OTLP_PROTOCOL`` / ``..._TRACES_PROTOCOL`` (``grpc`` default, or ``http/protobuf``),
    ``OTEL_EXPORTER_OTLP_HEADERS`` / ``..._TRACES_HEADERS``, ``OTEL_BSP_SCHEDULE_DELAY`` (ms; default 200 for
    the local store, the SDK's 5000 for OTLP) and ``OTEL_RESOURCE_ATTRIBUTES`` from ``env``. Raises ValueError
    on an unsupported protocol or a malformed number. See the module docstring for repeated calls.
    """
    global _state
    destination = _destination(service_name, data_dir, env)
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()]))
    with _state_lock:
        if _state is None:
            processor = _SwappableSpanProcessor()
            provider = _install_provider(service_name, env)
            provider.add_span_processor(processor)
            _state = _Telemetry(provider, processor, service_name, None)
        elif service_name != _state.service_name:
            _log.info(
                "telemetry already initialised in this process; spans of %s keep service.name=%s",
                service_name,
                _state.service_name,
            )
        state = _state
        if state.destination == destination:
            return state.provider
        previous = state.processor.swap(
            BatchSpanProcessor(_exporter(destination), schedule_delay_millis=destination.schedule_delay_ms)
        )
        state.destination = destination
    if previous is not None:
        previous.shutdown()
    _log.debug("exporting spans to %s %s", destination.kind, destination.target)
    return state.provider


def _install_provider(service_name: str, env: Mapping[str, str]) -> TracerProvider:
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        # Installed by someone else (a test harness, auto-instrumentation): the global can't be replaced, so
        # export through it rather than through a provider no tracer would ever use.
        _log.warning("a global tracer provider already exists; adding the %s exporter to it", service_name)
        return current
    provider = TracerProvider(resource=_resource(service_name, env))
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        raise RuntimeError("could not install the global tracer provider")
    return provider


def shutdown_telemetry() -> None:
    """Flushes pending spans and closes the exporter; a no-op before ``init_telemetry``."""
    with _state_lock:
        state = _state
        if state is None:
            return
        previous = state.processor.swap(None)
        state.destination = None
    if previous is not None:
        previous.force_flush(_FLUSH_TIMEOUT_MS)
        previous.shutdown()


def export_environment() -> tuple[dict[str, str], dict[str, str]]:
    """The environment a child process needs for ``init_telemetry`` to export its spans where this process's go:
    (variables, secret variables) -- OTLP headers may carry a backend's credentials. Both empty while this process
    exports nothing (then neither does the child)."""
    with _state_lock:
        destination = _state.destination if _state is not None else None
    if destination is None:
        return {}, {}
    env: dict[str, str] = {}
    if destination.schedule_delay_ms is not None:
        env["OTEL_BSP_SCHEDULE_DELAY"] = f"{destination.schedule_delay_ms:g}"
    if destination.kind == "store":
        # The child's own store file goes into the same traces directory (<data_dir>/traces).
        env["AIDC_DATA_DIR"] = str(Path(destination.target).parent)
        return env, {}
    env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = destination.target
    env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = destination.protocol
    secret = {}
    if destination.headers:
        secret["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] = ",".join(
            f"{quote(key, safe='')}={quote(value, safe='')}" for key, value in destination.headers
        )
    return env, secret


def tracer(name: str) -> trace.Tracer:
    """The tracer for a module: ``tracer(__name__)``."""
    return trace.get_tracer(name)


def _destination(service_name: str, data_dir: Path, env: Mapping[str, str]) -> _Destination:
    delay = _schedule_delay(env)
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not traces_endpoint and not endpoint:
        return _Destination(
            "store",
            str(traces_dir(data_dir).resolve()),
            schedule_delay_ms=DEFAULT_STORE_SCHEDULE_DELAY_MS if delay is None else delay,
            service_name=service_name,
        )
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    if protocol not in _PROTOCOLS:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be one of {', '.join(_PROTOCOLS)}, not {protocol!r}")
    if traces_endpoint:
        target = traces_endpoint  # signal-specific endpoints are used as given
    elif protocol == "http/protobuf":
        target = endpoint.rstrip("/") + "/v1/traces"
    else:
        target = endpoint
    headers = _headers(env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS") or "")
    return _Destination("otlp", target, protocol, headers, delay)


def _exporter(destination: _Destination) -> SpanExporter:
    # Exporters are imported here so a process that never exports OTLP never loads them.
    if destination.kind == "store":
        return SpanStoreExporter(store_file(Path(destination.target), destination.service_name))
    headers = dict(destination.headers) or None
    if destination.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter(endpoint=destination.target, headers=headers)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    return GrpcExporter(endpoint=destination.target, headers=headers)


def _schedule_delay(env: Mapping[str, str]) -> float | None:
    raw = env.get("OTEL_BSP_SCHEDULE_DELAY", "").strip()
    if not raw:
        return None
    try:
        delay = float(raw)
    except ValueError:
        raise ValueError(f"OTEL_BSP_SCHEDULE_DELAY must be a number of milliseconds, not {raw!r}") from None
    if delay <= 0:
        raise ValueError(f"OTEL_BSP_SCHEDULE_DELAY must be positive, not {raw!r}")
    return delay


def _resource(service_name: str, env: Mapping[str, str]) -> Resource:
    attributes: dict[str, str | int] = {}
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    attributes["service.name"] = service_name
    attributes["service.instance.id"] = str(os.getpid())
    attributes["process.pid"] = os.getpid()
    # Resource(...) rather than Resource.create(...): create() reads os.environ, and env is the source here.
    return Resource.get_empty().merge(_sdk_resource()).merge(Resource(attributes))


def _sdk_resource() -> Resource:
    from opentelemetry.sdk.resources import TELEMETRY_SDK_LANGUAGE, TELEMETRY_SDK_NAME, TELEMETRY_SDK_VERSION
    from opentelemetry.sdk.version import __version__

    return Resource(
        {
            TELEMETRY_SDK_LANGUAGE: "python",
            TELEMETRY_SDK_NAME: "opentelemetry",
            TELEMETRY_SDK_VERSION: __version__,
        }
    )


def _headers(raw: str) -> tuple[tuple[str, str], ...]:
    headers: list[tuple[str, str]] = []
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            headers.append((unquote(key.strip()).lower(), unquote(value.strip())))
    return tuple(headers)
