"""The runner's spans: tracing set up from the environment its launcher gave it (the exporter settings of the
service that submitted it, and the W3C trace context of the submission as TRACEPARENT/TRACESTATE/BAGGAGE), so the
run's phases (data load, each epoch, evaluation, export) join the trace of the SubmitFineTune that started it.

Without exporter settings (the runner started by hand) nothing is set up and every span is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from opentelemetry import context, propagate, trace

__all__ = ["RUNNER_SERVICE", "phase", "traced_run"]

#: service.name of the runner's spans.
RUNNER_SERVICE = "training-runner"
_EXPORTER_VARIABLES = ("AIDC_DATA_DIR", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_CARRIER_VARIABLES = ("TRACEPARENT", "TRACESTATE", "BAGGAGE")

_tracer = trace.get_tracer(__name__)


@contextmanager
def traced_run(env: Mapping[str, str]) -> Iterator[None]:
    """The whole run as one span, a child of the submission's trace context; spans are flushed when it ends."""
    if not any(env.get(name) for name in _EXPORTER_VARIABLES):
        yield
        return
    # Imported here: the runner package itself stays free of the mesh runtime unless spans are exported.
    from services.mesh.telemetry import init_telemetry, shutdown_telemetry

    init_telemetry(RUNNER_SERVICE, Path(env.get("AIDC_DATA_DIR") or "."), env)
    carrier = {name.lower(): env[name] for name in _CARRIER_VARIABLES if env.get(name)}
    token = context.attach(propagate.extract(carrier))
    try:
        attributes: dict[str, str | int] = {
            "aidc.scheduler.job_id": env.get("AIDC_JOB_ID", ""),
            "aidc.scheduler.attempt": int(env.get("AIDC_JOB_ATTEMPT", "0") or 0),
        }
        with _tracer.start_as_current_span("runner: fine-tune", attributes=attributes):
            yield
    finally:
        context.detach(token)
        shutdown_telemetry()


@contextmanager
def phase(name: str, **attributes: str | int | float | bool) -> Iterator[trace.Span]:
    """A span for one phase of the run (``aidc.training.<key>`` attributes)."""
    with _tracer.start_as_current_span(
        f"runner: {name}", attributes={f"aidc.training.{k}": v for k, v in attributes.items()}
    ) as span:
        yield span
