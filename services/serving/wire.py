"""Reads and rewrites the few fields of KServe v2 inference messages the gateway needs, on their serialized bytes.

The gateway forwards ModelInfer requests and responses as bytes: parsing and re-encoding the tensors would cost
more than the whole latency budget (shared/RUNTIME.md). This module walks only the top level of a message in
protobuf wire format, reading the strings ``model_name`` (1), ``model_version`` (2) and ``id`` (3), which
ModelInferRequest and ModelInferResponse number alike, and skipping every other field by its length.

It rewrites by appending: for a singular scalar field the last occurrence on the wire wins, and occurrences of an
embedded message field are merged, so ``request + model_name=<x>`` parses as the request naming ``x``. That holds
only if the original bytes end on a field boundary, which ``read_header`` checks: it rejects every message whose
top level is truncated or malformed, so an appended field can never end up inside another one.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.mesh.errors import InvalidArgument

__all__ = [
    "InferHeader",
    "MalformedMessage",
    "MAX_FIELDS",
    "read_header",
    "route_request",
    "rename_response",
    "read_stream_response",
    "rewrite_stream_response",
]

_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5
_MODEL_NAME, _MODEL_VERSION, _ID = 1, 2, 3
#: ModelStreamInferResponse: error_message = 1, infer_response = 2.
_STREAM_ERROR, _STREAM_RESPONSE = 1, 2
_MAX_TAG = 0xFFFFFFFF
_MAX_VARINT_BYTES = 10
_MAX_TAG_BYTES = 5
#: Deepest nesting of groups protobuf's own parser accepts.
_MAX_GROUP_DEPTH = 100
#: Fields read at most per message: a real request has a few per tensor, and a message of millions of tiny fields
#: would otherwise hold the event loop for seconds.
MAX_FIELDS = 10_000


class MalformedMessage(InvalidArgument):
    """The bytes are not a well-formed protobuf message."""


@dataclass(frozen=True, slots=True)
class InferHeader:
    """The fields of a ModelInferRequest/Response that name what it is for."""

    model_name: str
    model_version: str
    id: str


_NO_HEADER = InferHeader("", "", "")


def _varint(data: bytes | memoryview, pos: int, end: int, max_bytes: int = _MAX_VARINT_BYTES) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    value = 0
    shift = 0
    for i in range(pos, min(end, pos + max_bytes)):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise MalformedMessage("malformed message: truncated or overlong varint")


def _tag(data: bytes | memoryview, pos: int, end: int) -> tuple[int, int, int]:
    """(field number, wire type, position after the tag); one-byte tags (fields 1-15) take the short way."""
    byte = data[pos]
    if byte < 0x80:
        key, pos = byte, pos + 1
    else:
        key, pos = _varint(data, pos, end, _MAX_TAG_BYTES)
        if key > _MAX_TAG:
            raise MalformedMessage("malformed message: field tag out of range")
    if key < 8:
        raise MalformedMessage("malformed message: field number 0")
    return key >> 3, key & 7, pos


def _skip(data: bytes | memoryview, pos: int, end: int, wire_type: int) -> int:
    """The position after the value of a field (not a group) whose tag ended at ``pos``."""
    if wire_type == _VARINT:
        return _varint(data, pos, end)[1]
    if wire_type == _LENGTH:
        length, pos = _varint(data, pos, end)
        pos += length
    elif wire_type == _FIXED64:
        pos += 8
    elif wire_type == _FIXED32:
        pos += 4
    elif wire_type == _END_GROUP:
        raise MalformedMessage("malformed message: end of a group that never started")
    else:
        raise MalformedMessage(f"malformed message: unexpected wire type {wire_type}")
    if pos > end:
        raise MalformedMessage("malformed message: a field runs past the end")
    return pos


def _spend(budget: int) -> int:
    """One field read: the fields left to read."""
    if budget <= 0:
        raise MalformedMessage(f"malformed message: more than {MAX_FIELDS} fields")
    return budget - 1


def _skip_group(data: bytes | memoryview, pos: int, end: int, field: int, depth: int, budget: int) -> tuple[int, int]:
    """The position after the end-group tag matching a group of ``field`` that started at ``pos``, and the fields
    left to read (a group's fields count against the message's)."""
    if depth > _MAX_GROUP_DEPTH:
        raise MalformedMessage("malformed message: groups nested too deeply")
    while pos < end:
        budget = _spend(budget)
        inner, wire_type, pos = _tag(data, pos, end)
        if wire_type == _END_GROUP:
            if inner != field:
                raise MalformedMessage("malformed message: mismatched end of group")
            return pos, budget
        if wire_type == _START_GROUP:
            pos, budget = _skip_group(data, pos, end, inner, depth + 1, budget)
        else:
            pos = _skip(data, pos, end, wire_type)
    raise MalformedMessage("malformed message: unterminated group")


def _text(data: bytes | memoryview, start: int, stop: int) -> str:
    try:
        return str(data[start:stop], "utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage("malformed message: a string field is not valid UTF-8") from None


def _scan_header(data: bytes | memoryview, pos: int, end: int, merged: InferHeader = _NO_HEADER) -> InferHeader:
    """Fields 1-3 of the message in ``data[pos:end]`` (merged into ``merged``, as a parser merges a repeated
    embedded message); the last occurrence of each wins, as in any parser."""
    name, version, request_id = merged.model_name, merged.model_version, merged.id
    budget = MAX_FIELDS
    while pos < end:
        budget = _spend(budget)
        # One-byte tags and lengths inline: this loop runs on every request.
        key = data[pos]
        if key < 0x80 and key >= 8:
            field, wire_type, pos = key >> 3, key & 7, pos + 1
        else:
            field, wire_type, pos = _tag(data, pos, end)
        if wire_type == _LENGTH:
            length = data[pos] if pos < end else 0x80
            if length < 0x80:
                start = pos + 1
            else:
                length, start = _varint(data, pos, end)
            pos = start + length
            if pos > end:
                raise MalformedMessage("malformed message: a field runs past the end")
            if field == _MODEL_NAME:
                name = _text(data, start, pos)
            elif field == _MODEL_VERSION:
                version = _text(data, start, pos)
            elif field == _ID:
                request_id = _text(data, start, pos)
        elif wire_type == _START_GROUP:
            pos, budget = _skip_group(data, pos, end, field, 1, budget)
        else:
            pos = _skip(data, pos, end, wire_type)
    return InferHeader(name, version, request_id)


def read_header(data: bytes) -> InferHeader:
    """model_name, model_version and id of a serialized ModelInferRequest (or ModelInferResponse).

    Raises MalformedMessage (INVALID_ARGUMENT) unless the top level of ``data`` is well-formed; nested messages
    (the tensors) are not looked into: Triton validates them.
    """
    return _scan_header(data, 0, len(data))


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string_field(field: int, value: str) -> bytes:
    encoded = value.encode()
    return _encode_varint(field << 3 | _LENGTH) + _encode_varint(len(encoded)) + encoded


def route_request(data: bytes, model_name: str, model_version: str, request_id: str | None = None) -> bytes:
    """A ModelInferRequest (already checked by ``read_header``) redirected to Triton's model and version (and
    given another id, unless ``request_id`` is None)."""
    routed = data + _string_field(_MODEL_NAME, model_name) + _string_field(_MODEL_VERSION, model_version)
    return routed if request_id is None else routed + _string_field(_ID, request_id)


def rename_response(data: bytes, model_name: str) -> bytes:
    """A ModelInferResponse from Triton naming the model as the caller did."""
    return data + _string_field(_MODEL_NAME, model_name)


def read_stream_response(data: bytes) -> tuple[str, InferHeader]:
    """error_message and the header of infer_response of a serialized ModelStreamInferResponse.

    Several occurrences of infer_response merge, as they do in any parser.
    """
    error = ""
    header = _NO_HEADER
    view = memoryview(data)
    pos, end = 0, len(data)
    budget = MAX_FIELDS
    while pos < end:
        budget = _spend(budget)
        field, wire_type, pos = _tag(view, pos, end)
        if wire_type == _START_GROUP:
            pos, budget = _skip_group(view, pos, end, field, 1, budget)
            continue
        if wire_type != _LENGTH or field > _STREAM_RESPONSE:
            pos = _skip(view, pos, end, wire_type)
            continue
        length, start = _varint(view, pos, end)
        pos = start + length
        if pos > end:
            raise MalformedMessage("malformed message: a field runs past the end")
        if field == _STREAM_ERROR:
            error = _text(view, start, pos)
        else:
            header = _scan_header(view, start, pos, header)
    return error, header


def rewrite_stream_response(data: bytes, model_name: str, request_id: str) -> bytes:
    """A ModelStreamInferResponse whose infer_response names the model as the caller did and carries the caller's
    request id (an appended infer_response merges into the first)."""
    inner = _string_field(_MODEL_NAME, model_name) + _string_field(_ID, request_id)
    return data + _encode_varint(_STREAM_RESPONSE << 3 | _LENGTH) + _encode_varint(len(inner)) + inner
