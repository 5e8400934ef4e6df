"""The local span store: finished spans as JSON lines under ``<data_dir>/traces/``, and the readers over it.

Without an OpenTelemetry backend, every process of the mesh appends its spans to its own file
(``<service>-<pid>.jsonl``) and the local collector appends what Triton sends it to ``collector-<pid>.jsonl``;
no two processes ever write the same file, so no locking across processes is needed. A reader merges all
files of the directory. Writers append whole lines in one ``write`` per batch, so the only damage a reader
can see is a torn last line of a file that is being written; it is skipped.

Also here: converters from the two OTLP/HTTP body encodings (JSON, as Triton sends it, and protobuf) and
from SDK spans into the one record type, and ``render_tree`` for showing a trace to a person.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

if TYPE_CHECKING:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.sdk.trace import ReadableSpan

__all__ = [
    "OtlpDecodeError",
    "SpanRecord",
    "SpanStore",
    "SpanStoreExporter",
    "SpanStoreWriter",
    "TraceSummary",
    "record_from_readable_span",
    "render_tree",
    "spans_from_otlp_json",
    "spans_from_otlp_proto",
    "store_file",
    "traces_dir",
]

_log = logging.getLogger(__name__)

_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_SPAN_ID = re.compile(r"^[0-9a-f]{16}$")
_ZERO_SPAN_ID = "0" * 16
_STATUS_CODES = ("UNSET", "OK", "ERROR")
# OTLP's SpanKind enum (differs from the Python API's numbering).
_OTLP_KINDS = ("UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")
_UNKNOWN_SERVICE = "unknown_service"

#: Attribute keys worth showing next to a span in ``render_tree`` (plus every ``aidc.*`` key).
_KEY_ATTRIBUTES = (
    "rpc.service",
    "rpc.method",
    "rpc.grpc.status_code",
    "http.request.method",
    "http.method",
    "url.path",
    "http.response.status_code",
    "http.status_code",
    "triton.model_name",
    "triton.model_version",
    "model_name",
    "model_version",
    "error.type",
)
_MAX_SHOWN_VALUE = 60


class OtlpDecodeError(ValueError):
    """An OTLP request body that is not a valid trace export request."""


@dataclass(frozen=True)
class SpanRecord:
    """One finished span as the local store keeps it: ids in lowercase hex, times in Unix nanoseconds."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    kind: str
    start_ns: int
    end_ns: int
    status_code: str = "UNSET"
    status_message: str = ""
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _TRACE_ID.match(self.trace_id):
            raise ValueError(f"trace_id must be 32 lowercase hex digits, not {self.trace_id!r}")
        if not _SPAN_ID.match(self.span_id):
            raise ValueError(f"span_id must be 16 lowercase hex digits, not {self.span_id!r}")
        if self.parent_span_id and not _SPAN_ID.match(self.parent_span_id):
            raise ValueError(f"parent_span_id must be empty or 16 lowercase hex digits, not {self.parent_span_id!r}")
        if self.status_code not in _STATUS_CODES:
            raise ValueError(f"status_code must be one of {_STATUS_CODES}, not {self.status_code!r}")

    @property
    def duration_ns(self) -> int:
        """How long the span took; never negative, even for clock-skewed input."""
        return max(0, self.end_ns - self.start_ns)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict with the field names as keys."""
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "service": self.service,
            "kind": self.kind,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "status_code": self.status_code,
            "status_message": self.status_message,
            "attributes": dict(self.attributes),
        }

    def to_json(self) -> str:
        """One line of JSON (no newline)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpanRecord:
        """The inverse of ``to_dict``; raises ValueError on missing or malformed fields."""
        try:
            attributes = data.get("attributes") or {}
            if not isinstance(attributes, Mapping):
                raise ValueError("attributes must be an object")
            return cls(
                trace_id=str(data["trace_id"]),
                span_id=str(data["span_id"]),
                parent_span_id=str(data.get("parent_span_id") or ""),
                name=str(data["name"]),
                service=str(data.get("service") or _UNKNOWN_SERVICE),
                kind=str(data.get("kind") or "INTERNAL"),
                start_ns=int(data["start_ns"]),
                end_ns=int(data["end_ns"]),
                status_code=str(data.get("status_code") or "UNSET"),
                status_message=str(data.get("status_message") or ""),
                attributes=dict(attributes),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a span record: {exc}") from exc

    @classmethod
    def from_json(cls, line: str) -> SpanRecord:
        """The inverse of ``to_json``; raises ValueError on anything else."""
        data = json.loads(line)
        if not isinstance(data, Mapping):
            raise ValueError("a span record must be a JSON object")
        return cls.from_dict(data)


@dataclass(frozen=True)
class TraceSummary:
    """One line of ``SpanStore.recent_traces``: a trace's root span and overall duration."""

    trace_id: str
    root_name: str
    root_service: str
    start_ns: int
    end_ns: int
    span_count: int

    @property
    def duration_ns(self) -> int:
        """From the first span's start to the last span's end."""
        return max(0, self.end_ns - self.start_ns)


def traces_dir(data_dir: Path) -> Path:
    """The span store's directory under a data directory."""
    return data_dir / "traces"


def store_file(directory: Path, writer_name: str, pid: int | None = None) -> Path:
    """A process's own file in a traces directory, ``<writer_name>-<pid>.jsonl``: never shared."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in writer_name) or "spans"
    return directory / f"{safe}-{os.getpid() if pid is None else pid}.jsonl"


class SpanStoreWriter:
    """Appends span records to one JSONL file: one ``write`` per batch, opened lazily, safe across threads."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._closed = False

    @property
    def path(self) -> Path:
        """The file this writer appends to."""
        return self._path

    def append(self, records: Iterable[SpanRecord]) -> int:
        """Appends the records as lines; returns how many. Raises OSError on write failure."""
        lines = [record.to_json() + "\n" for record in records]
        if not lines:
            return 0
        data = "".join(lines).encode("utf-8")
        with self._lock:
            if self._closed:
                raise OSError(f"span store writer for {self._path} is closed")
            if self._fd is None:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        return len(lines)

    def close(self) -> None:
        """Closes the file; later appends raise OSError."""
        with self._lock:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class SpanStoreExporter(SpanExporter):
    """An OpenTelemetry span exporter appending to the local span store (put it in a BatchSpanProcessor)."""

    def __init__(self, path: Path) -> None:
        self._writer = SpanStoreWriter(path)

    @property
    def path(self) -> Path:
        """The JSONL file this exporter writes."""
        return self._writer.path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Writes the batch as one append; FAILURE when the file can't be written."""
        try:
            self._writer.append(record_from_readable_span(span) for span in spans)
        except (OSError, ValueError):
            _log.warning("could not write %d spans to %s", len(spans), self._writer.path, exc_info=True)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Closes the file."""
        self._writer.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered here: every export is already written through."""
        return True


class SpanStore:
    """Reads every ``*.jsonl`` file of a traces directory as one store."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    @property
    def directory(self) -> Path:
        """The traces directory read."""
        return self._directory

    def iter_spans(self, contains: str = "") -> Iterator[SpanRecord]:
        """Every readable record in file order; ``contains`` skips lines without that text before parsing."""
        if not self._directory.is_dir():
            return
        for path in sorted(self._directory.glob("*.jsonl")):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                _log.warning("could not read span file %s", path, exc_info=True)
                continue
            for line in text.splitlines():
                if not line or (contains and contains not in line):
                    continue
                try:
                    yield SpanRecord.from_json(line)
                except ValueError:
                    # A torn last line of a file being written, or a line damaged by a crash.
                    _log.debug("skipping unreadable line in %s", path)

    def spans(self, trace_id: str) -> list[SpanRecord]:
        """The spans of one trace ordered by start time; duplicates (the same span exported twice) dropped."""
        wanted = trace_id.strip().lower()
        seen: dict[str, SpanRecord] = {}
        for record in self.iter_spans(contains=wanted):
            if record.trace_id == wanted:
                seen.setdefault(record.span_id, record)
        return sorted(seen.values(), key=lambda r: (r.start_ns, r.end_ns))

    def recent_traces(self, limit: int = 20) -> list[TraceSummary]:
        """The most recently started traces, newest first."""
        by_trace: dict[str, dict[str, SpanRecord]] = {}
        for record in self.iter_spans():
            by_trace.setdefault(record.trace_id, {}).setdefault(record.span_id, record)
        summaries = [_summarize(trace_id, list(spans.values())) for trace_id, spans in by_trace.items()]
        summaries.sort(key=lambda s: s.start_ns, reverse=True)
        return summaries[: max(0, limit)]


def _summarize(trace_id: str, spans: list[SpanRecord]) -> TraceSummary:
    ids = {span.span_id for span in spans}
    tops = [span for span in spans if span.parent_span_id not in ids]
    root = min(tops or spans, key=lambda s: s.start_ns)
    return TraceSummary(
        trace_id=trace_id,
        root_name=root.name,
        root_service=root.service,
        start_ns=min(span.start_ns for span in spans),
        end_ns=max(span.end_ns for span in spans),
        span_count=len(spans),
    )


# ---------------------------------------------------------------------------------------------- SDK spans


def record_from_readable_span(span: ReadableSpan) -> SpanRecord:
    """Converts a finished SDK span; the service is the span's resource ``service.name``."""
    context = span.get_span_context()
    if context is None:
        raise ValueError(f"span {span.name!r} has no context")
    parent = span.parent
    service = span.resource.attributes.get("service.name", _UNKNOWN_SERVICE)
    return SpanRecord(
        trace_id=format(context.trace_id, "032x"),
        span_id=format(context.span_id, "016x"),
        parent_span_id=format(parent.span_id, "016x") if parent is not None and parent.span_id else "",
        name=span.name,
        service=str(service),
        kind=span.kind.name,
        start_ns=span.start_time or 0,
        end_ns=span.end_time or span.start_time or 0,
        status_code=span.status.status_code.name,
        status_message=span.status.description or "",
        attributes={key: _json_value(value) for key, value in (span.attributes or {}).items()},
    )


def _json_value(value: Any) -> Any:
    if isinstance(value, str | bool | int | float) or value is None:
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_json_value(v) for v in value]
    return str(value)


# ---------------------------------------------------------------------------------------------- OTLP JSON


def spans_from_otlp_json(body: bytes | str | Mapping[str, Any]) -> list[SpanRecord]:
    """Converts an OTLP/HTTP JSON ``ExportTraceServiceRequest`` body (what Triton sends).

    Follows the OTLP JSON mapping: camelCase field names, trace and span ids as hex strings, 64-bit integers
    as decimal strings, enums as integers. Also accepted, for tolerance of other encoders: snake_case names,
    base64 ids (protobuf's canonical JSON), enum names, and the pre-1.0 ``instrumentationLibrarySpans``.
    Raises OtlpDecodeError, before returning anything, when any part is malformed.
    """
    if isinstance(body, Mapping):
        request: Any = body
    else:
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise OtlpDecodeError(f"body is not JSON: {exc}") from exc
    if not isinstance(request, Mapping):
        raise OtlpDecodeError("body must be a JSON object with resourceSpans")
    records: list[SpanRecord] = []
    for i, resource_spans in enumerate(_json_list(request, "resourceSpans", "resource_spans", where="request")):
        where = f"resourceSpans[{i}]"
        resource = _json_object(resource_spans, "resource", where=where)
        resource_attributes = _json_attributes(resource, where=f"{where}.resource")
        service = str(resource_attributes.get("service.name") or _UNKNOWN_SERVICE)
        scopes = _json_list(resource_spans, "scopeSpans", "scope_spans", where=where) or _json_list(
            resource_spans, "instrumentationLibrarySpans", "instrumentation_library_spans", where=where
        )
        for j, scope_spans in enumerate(scopes):
            for k, span in enumerate(_json_list(scope_spans, "spans", "spans", where=f"{where}.scopeSpans[{j}]")):
                span_where = f"{where}.scopeSpans[{j}].spans[{k}]"
                records.append(_json_span(span, service, span_where))
    return records


def _json_span(span: Any, service: str, where: str) -> SpanRecord:
    if not isinstance(span, Mapping):
        raise OtlpDecodeError(f"{where} must be an object")
    status = _json_object(span, "status", where=where)
    try:
        return SpanRecord(
            trace_id=_json_id(_field(span, "traceId", "trace_id"), 16, f"{where}.traceId"),
            span_id=_json_id(_field(span, "spanId", "span_id"), 8, f"{where}.spanId"),
            parent_span_id=_json_id(
                _field(span, "parentSpanId", "parent_span_id"), 8, f"{where}.parentSpanId", optional=True
            ),
            name=str(_field(span, "name", "name") or ""),
            service=service,
            kind=_enum_name(_field(span, "kind", "kind"), _OTLP_KINDS, "SPAN_KIND_", f"{where}.kind"),
            start_ns=_json_int(_field(span, "startTimeUnixNano", "start_time_unix_nano"), f"{where}.startTimeUnixNano"),
            end_ns=_json_int(_field(span, "endTimeUnixNano", "end_time_unix_nano"), f"{where}.endTimeUnixNano"),
            status_code=_enum_name(status.get("code"), _STATUS_CODES, "STATUS_CODE_", f"{where}.status.code"),
            status_message=str(status.get("message") or ""),
            attributes=_json_attributes(span, where=where),
        )
    except ValueError as exc:
        if isinstance(exc, OtlpDecodeError):
            raise
        raise OtlpDecodeError(f"{where}: {exc}") from exc


def _field(message: Mapping[str, Any], camel: str, snake: str) -> Any:
    return message[camel] if camel in message else message.get(snake)


def _json_list(message: Any, camel: str, snake: str, *, where: str) -> list[Any]:
    if not isinstance(message, Mapping):
        raise OtlpDecodeError(f"{where} must be an object")
    value = _field(message, camel, snake)
    if value is None:
        return []
    if not isinstance(value, list):
        raise OtlpDecodeError(f"{where}.{camel} must be a list")
    return value


def _json_object(message: Mapping[str, Any], name: str, *, where: str) -> Mapping[str, Any]:
    value = message.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise OtlpDecodeError(f"{where}.{name} must be an object")
    return value


def _json_id(value: Any, size: int, where: str, *, optional: bool = False) -> str:
    if value in (None, ""):
        if optional:
            return ""
        raise OtlpDecodeError(f"{where} is missing")
    if not isinstance(value, str):
        raise OtlpDecodeError(f"{where} must be a hex string")
    text = value.strip().lower()
    if len(text) == 2 * size and all(c in "0123456789abcdef" for c in text):
        raw = bytes.fromhex(text)
    else:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != size:
            raise OtlpDecodeError(f"{where} must be {2 * size} hex digits, not {value!r}")
    if not any(raw):
        if optional:
            return ""
        raise OtlpDecodeError(f"{where} must not be all zeros")
    return raw.hex()


def _json_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise OtlpDecodeError(f"{where} must be an integer")
    if value is None:
        return 0
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise OtlpDecodeError(f"{where} must be an integer, not {value!r}") from exc


def _enum_name(value: Any, names: Sequence[str], prefix: str, where: str) -> str:
    if value is None:
        return names[0]  # proto3 default: SPAN_KIND_UNSPECIFIED, STATUS_CODE_UNSET
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    if isinstance(value, str):
        name = value.upper().removeprefix(prefix)
        if name in names:
            return name
    raise OtlpDecodeError(f"{where} has an unknown value {value!r}")


def _json_attributes(message: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    for i, entry in enumerate(_json_list(message, "attributes", "attributes", where=where)):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("key"), str):
            raise OtlpDecodeError(f"{where}.attributes[{i}] must be an object with a string key")
        attributes[entry["key"]] = _json_any_value(entry.get("value"), f"{where}.attributes[{i}]")
    return attributes


def _json_any_value(value: Any, where: str) -> Any:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise OtlpDecodeError(f"{where}.value must be an object")
    if "stringValue" in value or "string_value" in value:
        return str(_field(value, "stringValue", "string_value"))
    if "boolValue" in value or "bool_value" in value:
        return bool(_field(value, "boolValue", "bool_value"))
    if "intValue" in value or "int_value" in value:
        return _json_int(_field(value, "intValue", "int_value"), f"{where}.intValue")
    if "doubleValue" in value or "double_value" in value:
        raw = _field(value, "doubleValue", "double_value")
        try:
            return float(raw)
        except (TypeError, ValueError) as exc:
            raise OtlpDecodeError(f"{where}.doubleValue must be a number, not {raw!r}") from exc
    if "arrayValue" in value or "array_value" in value:
        array = _field(value, "arrayValue", "array_value")
        items = _json_list(array, "values", "values", where=f"{where}.arrayValue")
        return [_json_any_value(item, f"{where}.arrayValue.values[{n}]") for n, item in enumerate(items)]
    if "kvlistValue" in value or "kvlist_value" in value:
        kvlist = _field(value, "kvlistValue", "kvlist_value")
        if not isinstance(kvlist, Mapping):
            raise OtlpDecodeError(f"{where}.kvlistValue must be an object")
        return _json_attributes({"attributes": kvlist.get("values") or []}, where=f"{where}.kvlistValue")
    if "bytesValue" in value or "bytes_value" in value:
        return str(_field(value, "bytesValue", "bytes_value"))
    return None


# ------------------------------------------------------------------------------------------ OTLP protobuf


def spans_from_otlp_proto(body: bytes | ExportTraceServiceRequest) -> list[SpanRecord]:
    """Converts an OTLP/HTTP protobuf ``ExportTraceServiceRequest`` body (what the Python SDK sends).

    Raises OtlpDecodeError, before returning anything, when the body doesn't parse or an id is malformed.
    """
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    if isinstance(body, bytes | bytearray | memoryview):
        try:
            request = ExportTraceServiceRequest.FromString(bytes(body))
        except DecodeError as exc:
            raise OtlpDecodeError(f"body is not a protobuf ExportTraceServiceRequest: {exc}") from exc
    else:
        request = body
    records: list[SpanRecord] = []
    for i, resource_spans in enumerate(request.resource_spans):
        resource_attributes = _proto_attributes(resource_spans.resource.attributes)
        service = str(resource_attributes.get("service.name") or _UNKNOWN_SERVICE)
        for j, scope_spans in enumerate(resource_spans.scope_spans):
            for k, span in enumerate(scope_spans.spans):
                where = f"resource_spans[{i}].scope_spans[{j}].spans[{k}]"
                kind = span.kind if 0 <= span.kind < len(_OTLP_KINDS) else 0
                code = span.status.code if 0 <= span.status.code < len(_STATUS_CODES) else 0
                records.append(
                    SpanRecord(
                        trace_id=_proto_id(span.trace_id, 16, f"{where}.trace_id"),
                        span_id=_proto_id(span.span_id, 8, f"{where}.span_id"),
                        parent_span_id=_proto_id(span.parent_span_id, 8, f"{where}.parent_span_id", optional=True),
                        name=span.name,
                        service=service,
                        kind=_OTLP_KINDS[kind],
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        status_code=_STATUS_CODES[code],
                        status_message=span.status.message,
                        attributes=_proto_attributes(span.attributes),
                    )
                )
    return records


def _proto_id(raw: bytes, size: int, where: str, *, optional: bool = False) -> str:
    if not raw or not any(raw):
        if optional:
            return ""
        raise OtlpDecodeError(f"{where} is missing")
    if len(raw) != size:
        raise OtlpDecodeError(f"{where} must be {size} bytes, not {len(raw)}")
    return raw.hex()


def _proto_attributes(attributes: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: _proto_any_value(kv.value) for kv in attributes}


def _proto_any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_proto_any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _proto_attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    if kind is None:
        return None
    return getattr(value, kind)


# ------------------------------------------------------------------------------------------------ render


def render_tree(spans: Sequence[SpanRecord]) -> str:
    """The trace as an indented tree, children under parents, siblings by start time.

    Each line reads ``name  [service]  12.3 ms`` followed by key attributes and, for failed spans, the error.
    Spans whose parent isn't among ``spans`` (e.g. the caller's span was never exported) are shown at the
    top level, as are spans caught in a parent cycle, so nothing given is ever left out.
    """
    unique: dict[str, SpanRecord] = {}
    for span in spans:
        unique.setdefault(span.span_id, span)
    children: dict[str, list[SpanRecord]] = {}
    roots: list[SpanRecord] = []
    for span in unique.values():
        if span.parent_span_id and span.parent_span_id in unique and span.parent_span_id != span.span_id:
            children.setdefault(span.parent_span_id, []).append(span)
        else:
            roots.append(span)

    def order(items: list[SpanRecord]) -> list[SpanRecord]:
        return sorted(items, key=lambda s: (s.start_ns, s.end_ns, s.name))

    lines: list[str] = []
    shown: set[str] = set()

    def walk(span: SpanRecord, depth: int) -> None:
        if span.span_id in shown:
            return
        shown.add(span.span_id)
        lines.append("  " * depth + _render_line(span))
        for child in order(children.get(span.span_id, [])):
            walk(child, depth + 1)

    for root in order(roots):
        walk(root, 0)
    for span in order([s for s in unique.values() if s.span_id not in shown]):
        walk(span, 0)
    return "\n".join(lines)


def _render_line(span: SpanRecord) -> str:
    parts = [span.name or "(unnamed)", f"[{span.service}]", f"{span.duration_ns / 1e6:.1f} ms"]
    keys = [key for key in _KEY_ATTRIBUTES if key in span.attributes]
    keys += sorted(key for key in span.attributes if key.startswith("aidc."))
    shown = " ".join(f"{key}={_short(span.attributes[key])}" for key in keys)
    if shown:
        parts.append(shown)
    if span.status_code == "ERROR":
        parts.append(f"ERROR: {span.status_message}" if span.status_message else "ERROR")
    return "  ".join(parts)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= _MAX_SHOWN_VALUE else text[: _MAX_SHOWN_VALUE - 1] + "…"
