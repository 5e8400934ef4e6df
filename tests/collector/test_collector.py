"""The collector as a real process: OTLP/HTTP JSON (Triton's encoding) and protobuf in, span store out."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.proto.trace.v1.trace_pb2 import Status as SpanStatus

from services.collector.config import CollectorConfig
from services.mesh.spanstore import SpanRecord, SpanStore
from tests.collector.harness import REPO_ROOT, post, running_collector

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
GATEWAY_SPAN = "00f067aa0ba902b7"  # the caller's span; Triton's root span is its child
INFER_SPAN = "a1b2c3d4e5f60718"
COMPUTE_SPAN = "0102030405060708"


def triton_json_body(trace_id: str = TRACE_ID) -> dict[str, Any]:
    """An export request shaped like Triton's (opentelemetry-cpp OTLP/HTTP JSON): hex ids, int64 as strings,
    enums as integers, camelCase names."""
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [
                        {"key": "service.name", "value": {"stringValue": "triton"}},
                        {"key": "telemetry.sdk.language", "value": {"stringValue": "cpp"}},
                    ]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "triton-server", "version": ""},
                        "spans": [
                            {
                                "traceId": trace_id,
                                "spanId": INFER_SPAN,
                                "parentSpanId": GATEWAY_SPAN,
                                "name": "InferRequest",
                                "kind": 2,
                                "startTimeUnixNano": "1700000000000000000",
                                "endTimeUnixNano": "1700000000006000000",
                                "attributes": [
                                    {"key": "triton.model_name", "value": {"stringValue": "bert"}},
                                    {"key": "triton.model_version", "value": {"intValue": "1"}},
                                    {"key": "triton.trace_id", "value": {"intValue": "7"}},
                                ],
                                "status": {},
                            },
                            {
                                "traceId": trace_id,
                                "spanId": COMPUTE_SPAN,
                                "parentSpanId": INFER_SPAN,
                                "name": "compute",
                                "kind": 1,
                                "startTimeUnixNano": "1700000000001000000",
                                "endTimeUnixNano": "1700000000005000000",
                                "attributes": [{"key": "batch", "value": {"doubleValue": 2.5}}],
                                "status": {"code": 2, "message": "model failed"},
                            },
                        ],
                    }
                ],
            }
        ]
    }


def _kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def protobuf_request() -> ExportTraceServiceRequest:
    """Two resources in one request: the gateway's server span and Triton's child span under it."""
    gateway = ResourceSpans(
        resource=Resource(attributes=[_kv("service.name", "serving")]),
        scope_spans=[
            ScopeSpans(
                spans=[
                    Span(
                        trace_id=bytes.fromhex(TRACE_ID),
                        span_id=bytes.fromhex(GATEWAY_SPAN),
                        name="/inference.GRPCInferenceService/ModelInfer",
                        kind=Span.SPAN_KIND_SERVER,
                        start_time_unix_nano=1_700_000_000_000_000_000,
                        end_time_unix_nano=1_700_000_000_010_000_000,
                        attributes=[_kv("rpc.method", "ModelInfer")],
                        status=SpanStatus(code=SpanStatus.STATUS_CODE_OK),
                    )
                ]
            )
        ],
    )
    triton = ResourceSpans(
        resource=Resource(attributes=[_kv("service.name", "triton")]),
        scope_spans=[
            ScopeSpans(
                spans=[
                    Span(
                        trace_id=bytes.fromhex(TRACE_ID),
                        span_id=bytes.fromhex(INFER_SPAN),
                        parent_span_id=bytes.fromhex(GATEWAY_SPAN),
                        name="InferRequest",
                        kind=Span.SPAN_KIND_SERVER,
                        start_time_unix_nano=1_700_000_000_001_000_000,
                        end_time_unix_nano=1_700_000_000_007_000_000,
                    )
                ]
            )
        ],
    )
    return ExportTraceServiceRequest(resource_spans=[gateway, triton])


def _span_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "traces").glob("*.jsonl"))


def test_triton_json_export_lands_in_store_with_edges(tmp_path: Path) -> None:
    with running_collector(tmp_path) as collector:
        status, body = post(collector.traces_url, json.dumps(triton_json_body()).encode(), "application/json")
        assert (status, json.loads(body)) == (200, {})

        spans = {s.span_id: s for s in SpanStore(tmp_path / "traces").spans(TRACE_ID)}
        assert set(spans) == {INFER_SPAN, COMPUTE_SPAN}
        infer, compute = spans[INFER_SPAN], spans[COMPUTE_SPAN]
        assert infer.parent_span_id == GATEWAY_SPAN  # joins the caller's trace
        assert compute.parent_span_id == INFER_SPAN
        assert {infer.service, compute.service} == {"triton"}
        assert (infer.kind, compute.kind) == ("SERVER", "INTERNAL")
        assert (infer.start_ns, infer.end_ns) == (1_700_000_000_000_000_000, 1_700_000_000_006_000_000)
        assert infer.attributes == {
            "triton.model_name": "bert",
            "triton.model_version": 1,
            "triton.trace_id": 7,
        }
        assert (compute.status_code, compute.status_message) == ("ERROR", "model failed")
        assert compute.attributes == {"batch": 2.5}
        # The collector writes only its own file, named after its pid.
        assert _span_files(tmp_path) == [collector.span_file]


def test_protobuf_export_lands_in_store_with_services_per_resource(tmp_path: Path) -> None:
    with running_collector(tmp_path) as collector:
        status, body = post(collector.traces_url, protobuf_request().SerializeToString(), "application/x-protobuf")
        assert status == 200
        assert ExportTraceServiceResponse.FromString(body) == ExportTraceServiceResponse()

        spans = SpanStore(tmp_path / "traces").spans(TRACE_ID)
        assert [(s.name, s.service, s.span_id, s.parent_span_id) for s in spans] == [
            ("/inference.GRPCInferenceService/ModelInfer", "serving", GATEWAY_SPAN, ""),
            ("InferRequest", "triton", INFER_SPAN, GATEWAY_SPAN),
        ]
        assert spans[0].status_code == "OK"
        assert spans[0].attributes == {"rpc.method": "ModelInfer"}


def test_gzip_body_is_accepted(tmp_path: Path) -> None:
    with running_collector(tmp_path) as collector:
        body = gzip.compress(json.dumps(triton_json_body()).encode())
        status, _ = post(collector.traces_url, body, "application/json", {"Content-Encoding": "gzip"})
        assert status == 200
        assert len(SpanStore(tmp_path / "traces").spans(TRACE_ID)) == 2


def _second_span_broken() -> bytes:
    body = triton_json_body()
    body["resourceSpans"][0]["scopeSpans"][0]["spans"][1]["spanId"] = "xyz"
    return json.dumps(body).encode()


def _proto_with_short_trace_id() -> bytes:
    request = protobuf_request()
    request.resource_spans[1].scope_spans[0].spans[0].trace_id = b"\x01\x02\x03"
    return request.SerializeToString()


@pytest.mark.parametrize(
    ("content_type", "body", "status", "reason"),
    [
        ("application/json", b"this is not json", 400, "not JSON"),
        ("application/json", b'["resourceSpans"]', 400, "JSON object"),
        ("application/json", b'{"resourceSpans": {"spans": []}}', 400, "must be a list"),
        ("application/json", _second_span_broken(), 400, "spanId"),
        ("application/x-protobuf", b"\xff\xff\xff garbage", 400, "protobuf"),
        ("application/x-protobuf", _proto_with_short_trace_id(), 400, "trace_id"),
        ("text/plain", json.dumps(triton_json_body()).encode(), 415, "Content-Type"),
    ],
    ids=["not-json", "not-object", "wrong-shape", "one-bad-span", "not-protobuf", "short-id", "media-type"],
)
def test_bad_bodies_are_rejected_and_nothing_is_stored(
    tmp_path: Path, content_type: str, body: bytes, status: int, reason: str
) -> None:
    with running_collector(tmp_path) as collector:
        got_status, got_body = post(collector.traces_url, body, content_type)
        assert got_status == status
        if content_type == "application/x-protobuf":
            message = Status.FromString(got_body).message
        elif content_type == "application/json":
            message = json.loads(got_body)["message"]
        else:
            message = got_body.decode()
        assert reason in message
        assert _span_files(tmp_path) == []  # not even the good first span of "one-bad-span"
        # The collector keeps serving after a bad request.
        good_status, _ = post(collector.traces_url, json.dumps(triton_json_body()).encode(), "application/json")
        assert good_status == 200


def test_healthz_and_unknown_paths(tmp_path: Path) -> None:
    with running_collector(tmp_path) as collector:
        with urllib.request.urlopen(f"{collector.base_url}/healthz", timeout=5) as response:
            assert (response.status, response.read()) == (200, b"ok")
        status, _ = post(f"{collector.base_url}/v1/metrics", b"{}", "application/json")
        assert status == 404


def test_sigterm_stops_gracefully_and_keeps_what_was_stored(tmp_path: Path) -> None:
    with running_collector(tmp_path) as collector:
        post(collector.traces_url, json.dumps(triton_json_body()).encode(), "application/json")
        started = time.monotonic()
        collector.process.send_signal(signal.SIGTERM)
        assert collector.process.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        log = collector.log()
    assert "collector stopped" in log
    # Logs are JSON lines carrying the service name.
    first = json.loads(log.splitlines()[0])
    assert first["service"] == "collector" and "collector listening on http://127.0.0.1:" in first["message"]
    assert len(SpanStore(tmp_path / "traces").spans(TRACE_ID)) == 2


def test_bad_address_fails_fast_with_exit_code_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDC_")}
    env.update(AIDC_COLLECTOR_ADDR="localhost", AIDC_DATA_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "services.collector"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=30
    )
    assert result.returncode == 2
    assert b"AIDC_COLLECTOR_ADDR must be HOST:PORT" in result.stderr


def test_config_defaults() -> None:
    config = CollectorConfig.from_env({})
    assert (config.host, config.port, config.data_dir) == ("127.0.0.1", 50060, Path(".aidc"))
    assert config.traces_dir == Path(".aidc/traces")


@pytest.mark.parametrize(
    ("addr", "host", "port"),
    [("0.0.0.0:4318", "0.0.0.0", 4318), ("[::1]:4318", "::1", 4318), ("127.0.0.1:0", "127.0.0.1", 0)],
)
def test_config_accepts_addresses(addr: str, host: str, port: int) -> None:
    config = CollectorConfig.from_env({"AIDC_COLLECTOR_ADDR": addr, "AIDC_DATA_DIR": "/data"})
    assert (config.host, config.port, config.data_dir) == (host, port, Path("/data"))


@pytest.mark.parametrize("addr", ["localhost", "127.0.0.1:", ":4318", "127.0.0.1:99999", "127.0.0.1:http"])
def test_config_rejects_bad_addresses(addr: str) -> None:
    with pytest.raises(ValueError, match="AIDC_COLLECTOR_ADDR"):
        CollectorConfig.from_env({"AIDC_COLLECTOR_ADDR": addr})


def test_config_rejects_bad_log_level() -> None:
    with pytest.raises(ValueError, match="AIDC_LOG_LEVEL"):
        CollectorConfig.from_env({"AIDC_LOG_LEVEL": "chatty"})


def test_json_body_round_trips_through_record_json(tmp_path: Path) -> None:
    """What the collector writes reads back identically (the store format is stable)."""
    with running_collector(tmp_path) as collector:
        post(collector.traces_url, json.dumps(triton_json_body()).encode(), "application/json")
        lines = collector.span_file.read_text().splitlines()
    records = [SpanRecord.from_json(line) for line in lines]
    assert [SpanRecord.from_json(r.to_json()) for r in records] == records
