"""init_telemetry: spans reach the local span store or, with OTEL_EXPORTER_OTLP_ENDPOINT, a real collector."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from opentelemetry import baggage, context, propagate, trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.mesh.spanstore import SpanRecord, SpanStore, spans_from_otlp_proto
from services.mesh.telemetry import _destination, export_environment, init_telemetry, shutdown_telemetry, tracer
from tests.collector.harness import REPO_ROOT, running_collector

SERVICE = "telemetry-test"


@pytest.fixture(autouse=True)
def _clean_telemetry() -> Iterator[None]:
    yield
    shutdown_telemetry()


def _store(data_dir: Path) -> SpanStore:
    return SpanStore(data_dir / "traces")


def _ids(span: trace.Span) -> tuple[str, str]:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def _wait_for_spans(store: SpanStore, trace_id: str, count: int, timeout: float) -> list[SpanRecord]:
    deadline = time.monotonic() + timeout
    while True:
        spans = store.spans(trace_id)
        if len(spans) >= count or time.monotonic() > deadline:
            return spans
        time.sleep(0.02)


def _parent_and_child(service_tracer: trace.Tracer) -> tuple[str, str, str]:
    with service_tracer.start_as_current_span("handle", kind=SpanKind.SERVER) as parent:
        parent.set_attribute("aidc.test.tenant", "acme")
        with service_tracer.start_as_current_span("query") as child:
            child.set_status(Status(StatusCode.ERROR, "db down"))
    trace_id, parent_id = _ids(parent)
    return trace_id, parent_id, _ids(child)[1]


def test_spans_reach_local_store_with_parent_child_edge(tmp_path: Path) -> None:
    provider = init_telemetry(SERVICE, tmp_path, env={})
    assert trace.get_tracer_provider() is provider
    trace_id, parent_id, child_id = _parent_and_child(tracer(__name__))
    assert provider.force_flush()

    spans = {s.span_id: s for s in _store(tmp_path).spans(trace_id)}
    assert set(spans) == {parent_id, child_id}
    parent, child = spans[parent_id], spans[child_id]
    assert parent.parent_span_id == "" and child.parent_span_id == parent_id
    assert parent.trace_id == child.trace_id == trace_id
    # The first init_telemetry of the process names the resource; see the fresh-process test for the name.
    service = provider.resource.attributes["service.name"]
    assert parent.service == child.service == service
    assert (parent.kind, parent.name, parent.attributes) == ("SERVER", "handle", {"aidc.test.tenant": "acme"})
    assert (child.status_code, child.status_message) == ("ERROR", "db down")
    assert child.start_ns >= parent.start_ns and child.end_ns <= parent.end_ns
    assert provider.resource.attributes["service.instance.id"] == str(os.getpid())
    # One file per process, named <service>-<pid>.jsonl.
    files = list((tmp_path / "traces").glob("*.jsonl"))
    assert len(files) == 1 and files[0].name.endswith(f"-{os.getpid()}.jsonl")


def test_local_store_batches_are_written_within_the_short_default_delay(tmp_path: Path) -> None:
    init_telemetry(SERVICE, tmp_path, env={})
    with tracer(__name__).start_as_current_span("quick") as span:
        pass
    # No force_flush: the 200 ms schedule delay must write it long before the SDK's 5 s default would (the bound is
    # 20 times the delay, for a loaded machine, and still below the default).
    started = time.monotonic()
    spans = _wait_for_spans(_store(tmp_path), _ids(span)[0], 1, timeout=4.0)
    assert [s.name for s in spans] == ["quick"]
    assert time.monotonic() - started < 4.0


def test_schedule_delay_env_overrides_default(tmp_path: Path) -> None:
    provider = init_telemetry(SERVICE, tmp_path, env={"OTEL_BSP_SCHEDULE_DELAY": "60000"})
    with tracer(__name__).start_as_current_span("slow") as span:
        pass
    trace_id = _ids(span)[0]
    assert _wait_for_spans(_store(tmp_path), trace_id, 1, timeout=1.0) == []
    provider.force_flush()
    assert len(_store(tmp_path).spans(trace_id)) == 1


def test_second_init_is_safe_and_does_not_duplicate_spans(tmp_path: Path) -> None:
    first = init_telemetry(SERVICE, tmp_path, env={})
    second = init_telemetry("another-service", tmp_path, env={})
    assert second is first
    with tracer(__name__).start_as_current_span("once") as span:
        pass
    first.force_flush()
    lines = [line for path in (tmp_path / "traces").glob("*.jsonl") for line in path.read_text().splitlines()]
    assert len(lines) == 1 and SpanRecord.from_json(lines[0]).span_id == _ids(span)[1]


def test_init_with_another_data_dir_redirects_spans(tmp_path: Path) -> None:
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    init_telemetry(SERVICE, old_dir, env={})
    with tracer(__name__).start_as_current_span("before") as before:
        pass
    provider = init_telemetry(SERVICE, new_dir, env={})
    with tracer(__name__).start_as_current_span("after") as after:
        pass
    provider.force_flush()
    # The switch flushed the old destination, so nothing is lost or misplaced.
    assert [s.name for s in _store(old_dir).spans(_ids(before)[0])] == ["before"]
    assert [s.name for s in _store(new_dir).spans(_ids(after)[0])] == ["after"]
    assert _store(old_dir).spans(_ids(after)[0]) == []


def test_spans_reach_the_collector_over_otlp_http_protobuf(tmp_path: Path) -> None:
    collector_dir, service_dir = tmp_path / "collector", tmp_path / "service"
    with running_collector(collector_dir) as collector:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.base_url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
        provider = init_telemetry(SERVICE, service_dir, env=env)
        trace_id, parent_id, child_id = _parent_and_child(tracer(__name__))
        assert provider.force_flush()

        spans = {s.span_id: s for s in _wait_for_spans(_store(collector_dir), trace_id, 2, timeout=10)}
        assert set(spans) == {parent_id, child_id}
        assert spans[child_id].parent_span_id == parent_id
        assert spans[parent_id].service == provider.resource.attributes["service.name"]
        assert spans[child_id].status_code == "ERROR"
        assert collector.span_file.exists()
    assert not (service_dir / "traces").exists()  # nothing went to the local store


class _RecordingTraceService(TraceServiceServicer):
    """A real OTLP/gRPC endpoint that keeps what it receives (the local collector speaks OTLP/HTTP only)."""

    def __init__(self) -> None:
        self.records: list[SpanRecord] = []

    def Export(  # noqa: N802 - the generated servicer's method name
        self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ExportTraceServiceResponse:
        self.records.extend(spans_from_otlp_proto(request))
        return ExportTraceServiceResponse()


def test_default_protocol_is_otlp_grpc(tmp_path: Path) -> None:
    receiver = _RecordingTraceService()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        provider = init_telemetry(SERVICE, tmp_path, env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
        trace_id, parent_id, child_id = _parent_and_child(tracer(__name__))
        assert provider.force_flush()
        shutdown_telemetry()  # closes the exporter's channel while the server is still up
    finally:
        server.stop(grace=None)
    edges = {(r.span_id, r.parent_span_id) for r in receiver.records if r.trace_id == trace_id}
    assert edges == {(parent_id, ""), (child_id, parent_id)}
    assert not (tmp_path / "traces").exists()


def test_propagation_is_w3c_tracecontext_and_baggage(tmp_path: Path) -> None:
    provider = init_telemetry(SERVICE, tmp_path, env={})
    carrier: dict[str, str] = {}
    token = context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        with tracer(__name__).start_as_current_span("client") as client:
            propagate.inject(carrier)
    finally:
        context.detach(token)
    trace_id, client_id = _ids(client)
    version, header_trace_id, header_span_id, flags = carrier["traceparent"].split("-")
    assert (version, header_trace_id, header_span_id) == ("00", trace_id, client_id)
    assert int(flags, 16) & 0x01  # sampled (newer SDKs also set 0x02, "random trace id")
    assert carrier["baggage"] == "tenant=acme"

    # The receiving side (another service, or Triton) continues the same trace.
    remote = propagate.extract(carrier)
    assert baggage.get_baggage("tenant", remote) == "acme"
    with tracer(__name__).start_as_current_span("server", context=remote, kind=SpanKind.SERVER) as server:
        pass
    provider.force_flush()
    stored = {s.name: s for s in _store(tmp_path).spans(trace_id)}
    assert stored["server"].parent_span_id == client_id
    assert stored["server"].span_id == _ids(server)[1]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "PROTOCOL",
        ),
        ({"OTEL_BSP_SCHEDULE_DELAY": "soon"}, "OTEL_BSP_SCHEDULE_DELAY"),
        ({"OTEL_BSP_SCHEDULE_DELAY": "0"}, "OTEL_BSP_SCHEDULE_DELAY"),
    ],
)
def test_bad_settings_fail_fast(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        init_telemetry(SERVICE, tmp_path, env=env)


def test_fresh_process_names_resource_and_file_and_shutdown_flushes(tmp_path: Path) -> None:
    """In its own process (the global provider is per process): the service's name and pid on the resource,
    ``<service>-<pid>.jsonl``, and shutdown_telemetry writing spans a 60 s batch delay still held."""
    script = textwrap.dedent(
        """
        import json, os, sys
        from pathlib import Path
        from services.mesh.telemetry import init_telemetry, shutdown_telemetry, tracer
        provider = init_telemetry("billing", Path(sys.argv[1]), env={"OTEL_BSP_SCHEDULE_DELAY": "60000"})
        with tracer("probe").start_as_current_span("charge") as span:
            pass
        shutdown_telemetry()
        print(json.dumps({"pid": os.getpid(), "trace_id": format(span.get_span_context().trace_id, "032x"),
                          "resource": dict(provider.resource.attributes)}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["resource"]["service.name"] == "billing"
    assert report["resource"]["service.instance.id"] == str(report["pid"])
    span_file = tmp_path / "traces" / f"billing-{report['pid']}.jsonl"
    records = [SpanRecord.from_json(line) for line in span_file.read_text().splitlines()]
    assert [(r.name, r.service, r.trace_id) for r in records] == [("charge", "billing", report["trace_id"])]


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_BSP_SCHEDULE_DELAY": "50"},
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20s3cret,x-tenant=a%2Cb",
        },
    ],
)
def test_a_child_given_the_export_environment_exports_where_this_process_does(
    tmp_path: Path, env: dict[str, str]
) -> None:
    assert export_environment() == ({}, {})  # nothing exported yet: a child exports nothing either
    init_telemetry(SERVICE, tmp_path / "data", env=env)
    plain, secret = export_environment()
    assert not any(k.startswith("OTEL_EXPORTER_OTLP_TRACES_HEADERS") for k in plain)  # credentials stay secret
    child = {**plain, **secret}
    mine = _destination(SERVICE, tmp_path / "data", env)
    assert _destination(SERVICE, Path(child.get("AIDC_DATA_DIR", "elsewhere")), child) == mine
