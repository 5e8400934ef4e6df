"""The span store: records, the JSONL writer and reader, the OTLP converters and the tree rendering."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.mesh.spanstore import (
    OtlpDecodeError,
    SpanRecord,
    SpanStore,
    SpanStoreExporter,
    SpanStoreWriter,
    record_from_readable_span,
    render_tree,
    spans_from_otlp_json,
    spans_from_otlp_proto,
    store_file,
)

TRACE = "0af7651916cd43dd8448eb211c80319c"
OTHER_TRACE = "11111111111111111111111111111111"


def rec(span_id: str, parent: str = "", *, start_ms: float = 0, dur_ms: float = 1, **kw: Any) -> SpanRecord:
    """A record in TRACE with times in milliseconds from an arbitrary origin."""
    fields: dict[str, Any] = {
        "trace_id": TRACE,
        "name": span_id,
        "service": "svc",
        "kind": "INTERNAL",
        **kw,
    }
    start = 1_700_000_000_000_000_000 + int(start_ms * 1e6)
    return SpanRecord(
        span_id=span_id.ljust(16, "0"),
        parent_span_id=parent.ljust(16, "0") if parent else "",
        start_ns=start,
        end_ns=start + int(dur_ms * 1e6),
        **fields,
    )


def sdk_spans() -> list[ReadableSpan]:
    """Real SDK spans (a server span with a child that failed) from a private provider."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "scheduler"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("SubmitJob", kind=SpanKind.SERVER) as parent:
        parent.set_attributes({"aidc.scheduler.job_id": "j-1", "retries": 2, "ratio": 0.5, "gpu": True})
        parent.set_attribute("tags", ["a", "b"])
        with tracer.start_as_current_span("db.insert", kind=SpanKind.CLIENT) as child:
            child.set_status(Status(StatusCode.ERROR, "constraint"))
    provider.shutdown()
    return list(exporter.get_finished_spans())


# ---------------------------------------------------------------------------------------------- records


def test_record_json_round_trip() -> None:
    record = rec("a1", "b2", status_code="ERROR", status_message="x", attributes={"k": [1, "two"], "n": None})
    line = record.to_json()
    assert "\n" not in line
    assert SpanRecord.from_json(line) == record
    assert record.duration_ns == 1_000_000


@pytest.mark.parametrize(
    "change",
    [
        {"trace_id": "xyz"},
        {"trace_id": TRACE.upper()},
        {"span_id": "123"},
        {"parent_span_id": "zz"},
        {"status_code": "FAILED"},
    ],
)
def test_record_rejects_malformed_fields(change: dict[str, str]) -> None:
    data = rec("a1").to_dict() | change
    with pytest.raises(ValueError):
        SpanRecord.from_dict(data)


def test_record_from_readable_span_keeps_ids_edges_and_attributes() -> None:
    child, parent = sdk_spans()
    records = {r.name: r for r in map(record_from_readable_span, (child, parent))}
    assert records["db.insert"].parent_span_id == format(parent.context.span_id, "016x")
    assert records["SubmitJob"].span_id == format(parent.context.span_id, "016x")
    assert records["SubmitJob"].trace_id == format(parent.context.trace_id, "032x")
    assert records["SubmitJob"].attributes == {
        "aidc.scheduler.job_id": "j-1",
        "retries": 2,
        "ratio": 0.5,
        "gpu": True,
        "tags": ["a", "b"],
    }
    assert (records["SubmitJob"].service, records["SubmitJob"].kind) == ("scheduler", "SERVER")
    assert (records["db.insert"].status_code, records["db.insert"].status_message) == ("ERROR", "constraint")
    json.loads(records["SubmitJob"].to_json())  # attributes stay JSON-encodable


# ------------------------------------------------------------------------------------ writer and reader


def test_store_merges_files_and_orders_by_start(tmp_path: Path) -> None:
    SpanStoreWriter(tmp_path / "a-1.jsonl").append([rec("b", "a", start_ms=5), rec("e", trace_id=OTHER_TRACE)])
    SpanStoreWriter(tmp_path / "triton-2.jsonl").append([rec("a", start_ms=0, dur_ms=10)])
    spans = SpanStore(tmp_path).spans(TRACE)
    assert [s.span_id[:1] for s in spans] == ["a", "b"]
    assert SpanStore(tmp_path).spans(TRACE.upper()) == spans  # ids are case-insensitive on input


def test_store_skips_torn_last_line_and_drops_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "svc-1.jsonl"
    SpanStoreWriter(path).append([rec("a"), rec("b", "a")])
    SpanStoreWriter(tmp_path / "svc-2.jsonl").append([rec("a")])  # the same span exported twice
    with path.open("a") as f:
        f.write(rec("c", "a").to_json()[:40])  # a writer caught mid-line
    assert [s.span_id[:1] for s in SpanStore(tmp_path).spans(TRACE)] == ["a", "b"]


def test_store_of_missing_directory_is_empty(tmp_path: Path) -> None:
    store = SpanStore(tmp_path / "nope")
    assert store.spans(TRACE) == [] and store.recent_traces() == []


def test_recent_traces_newest_first_with_root_and_duration(tmp_path: Path) -> None:
    SpanStoreWriter(tmp_path / "s-1.jsonl").append(
        [
            rec("c", "a", start_ms=1, dur_ms=20),  # the child outlasts its root
            rec("a", start_ms=0, dur_ms=10, name="Infer", service="serving"),
            rec("f", start_ms=100, trace_id=OTHER_TRACE, name="Login"),
        ]
    )
    newest, older = SpanStore(tmp_path).recent_traces()
    assert (newest.trace_id, newest.root_name, newest.span_count) == (OTHER_TRACE, "Login", 1)
    assert (older.trace_id, older.root_name, older.root_service) == (TRACE, "Infer", "serving")
    assert older.duration_ns == 21_000_000 and older.span_count == 2
    assert SpanStore(tmp_path).recent_traces(limit=1) == [newest]


def test_exporter_writes_one_append_per_batch_and_creates_file_lazily(tmp_path: Path) -> None:
    path = store_file(tmp_path / "traces", "scheduler", pid=42)
    assert path.name == "scheduler-42.jsonl"
    exporter = SpanStoreExporter(path)
    assert exporter.export([]) == SpanExportResult.SUCCESS and not path.exists()
    spans = sdk_spans()
    assert exporter.export(spans) == SpanExportResult.SUCCESS
    assert len(path.read_text().splitlines()) == 2 and path.read_text().endswith("\n")
    exporter.shutdown()
    assert exporter.export(spans) == SpanExportResult.FAILURE


def test_store_file_names_are_safe() -> None:
    assert store_file(Path("t"), "../evil name", pid=1) == Path("t/.._evil_name-1.jsonl")


# ---------------------------------------------------------------------------------------- OTLP bodies


def _as_otlp_json(request: ExportTraceServiceRequest) -> dict[str, Any]:
    """Encodes a request the way OTLP/HTTP JSON (and Triton) does: camelCase, ids hex, int64 strings,
    enums integers."""
    body = MessageToDict(request, use_integers_for_enums=True)
    for resource_spans in body["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return body


def test_protobuf_and_json_bodies_decode_to_what_the_sdk_recorded() -> None:
    spans = sdk_spans()
    expected = sorted(map(record_from_readable_span, spans), key=lambda r: r.span_id)
    request = encode_spans(spans)  # the SDK's own OTLP encoder

    from_proto = spans_from_otlp_proto(request.SerializeToString())
    from_json = spans_from_otlp_json(json.dumps(_as_otlp_json(request)).encode())
    assert sorted(from_proto, key=lambda r: r.span_id) == expected
    assert sorted(from_json, key=lambda r: r.span_id) == expected


def test_json_body_accepts_base64_ids_and_legacy_names() -> None:
    """Other encoders: protobuf JSON (base64 ids, enum names), the pre-1.0 instrumentationLibrarySpans."""
    body = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "legacy"}}]},
                "instrumentationLibrarySpans": [
                    {
                        "spans": [
                            {
                                "traceId": base64.b64encode(bytes.fromhex(TRACE)).decode(),
                                "spanId": base64.b64encode(bytes.fromhex("0102030405060708")).decode(),
                                "parentSpanId": "",
                                "name": "op",
                                "kind": "SPAN_KIND_CLIENT",
                                "startTimeUnixNano": 10,
                                "endTimeUnixNano": "25",
                                "status": {"code": "STATUS_CODE_OK"},
                                "attributes": [
                                    {"key": "list", "value": {"arrayValue": {"values": [{"intValue": "3"}]}}},
                                    {
                                        "key": "map",
                                        "value": {
                                            "kvlistValue": {"values": [{"key": "k", "value": {"boolValue": True}}]}
                                        },
                                    },
                                ],
                            }
                        ]
                    }
                ],
            }
        ]
    }
    (record,) = spans_from_otlp_json(body)
    assert (record.trace_id, record.span_id, record.parent_span_id) == (TRACE, "0102030405060708", "")
    assert (record.service, record.kind, record.status_code, record.duration_ns) == (
        "legacy",
        "CLIENT",
        "OK",
        15,
    )
    assert record.attributes == {"list": [3], "map": {"k": True}}


def test_missing_service_name_and_empty_request() -> None:
    assert spans_from_otlp_json(b"{}") == []
    assert spans_from_otlp_proto(b"") == []
    body = {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": TRACE, "spanId": "0102030405060708"}]}]}]}
    (record,) = spans_from_otlp_json(body)
    assert (record.service, record.kind, record.status_code) == ("unknown_service", "UNSPECIFIED", "UNSET")


def _span_body(**span: Any) -> dict[str, Any]:
    base = {"traceId": TRACE, "spanId": "0102030405060708", "name": "x"}
    return {"resourceSpans": [{"scopeSpans": [{"spans": [base | span]}]}]}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"resourceSpans": 5}', "must be a list"),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [7]}]}]}', "must be an object"),
        (_span_body(traceId="abc"), "traceId"),
        (_span_body(traceId="0" * 32), "all zeros"),
        (_span_body(spanId=None), "spanId is missing"),
        (_span_body(parentSpanId="0102"), "parentSpanId"),
        (_span_body(startTimeUnixNano="soon"), "startTimeUnixNano"),
        (_span_body(kind=9), "kind"),
        (_span_body(status={"code": "BROKEN"}), "status.code"),
        (_span_body(attributes=[{"value": {"stringValue": "no key"}}]), "attributes[0]"),
        (_span_body(attributes=[{"key": "d", "value": {"doubleValue": "pi"}}]), "doubleValue"),
    ],
)
def test_bad_json_bodies_raise_decode_errors(body: bytes | dict[str, Any], reason: str) -> None:
    with pytest.raises(OtlpDecodeError, match=re.escape(reason)):
        spans_from_otlp_json(json.dumps(body).encode() if isinstance(body, dict) else body)


def test_bad_protobuf_bodies_raise_decode_errors() -> None:
    with pytest.raises(OtlpDecodeError, match="not a protobuf"):
        spans_from_otlp_proto(b"\x0a\xff\xff")
    request = encode_spans(sdk_spans())
    request.resource_spans[0].scope_spans[0].spans[0].span_id = b"\x01"
    with pytest.raises(OtlpDecodeError, match="span_id must be 8 bytes"):
        spans_from_otlp_proto(request.SerializeToString())


# ---------------------------------------------------------------------------------------------- render


def test_render_tree_nests_children_by_start_time_with_key_attributes() -> None:
    spans = [
        rec(
            "c",
            "a",
            start_ms=6,
            dur_ms=2,
            name="second",
            service="triton",
            attributes={"triton.model_name": "m"},
        ),
        rec(
            "a",
            start_ms=0,
            dur_ms=12.34,
            name="Infer",
            service="serving",
            attributes={"aidc.serving.model": "m"},
        ),
        rec("b", "a", start_ms=1, dur_ms=3, name="first", service="auth", attributes={"noise": "hidden"}),
        rec("d", "b", start_ms=2, dur_ms=1, name="deep", status_code="ERROR", status_message="denied"),
    ]
    assert render_tree(spans).splitlines() == [
        "Infer  [serving]  12.3 ms  aidc.serving.model=m",
        "  first  [auth]  3.0 ms",
        "    deep  [svc]  1.0 ms  ERROR: denied",
        "  second  [triton]  2.0 ms  triton.model_name=m",
    ]


def test_render_tree_shows_orphans_at_top_level() -> None:
    spans = [rec("b", "f", start_ms=5, name="InferRequest"), rec("a", start_ms=0, name="root")]
    assert render_tree(spans).splitlines() == ["root  [svc]  1.0 ms", "InferRequest  [svc]  1.0 ms"]


def test_render_tree_never_drops_spans_in_a_parent_cycle() -> None:
    spans = [rec("a", "b", name="x"), rec("b", "a", name="y", start_ms=1)]
    assert sorted(line.strip().split()[0] for line in render_tree(spans).splitlines()) == ["x", "y"]
