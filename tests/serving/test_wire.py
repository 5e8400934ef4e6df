"""The gateway's wire-format reader and rewriter, checked against the generated Triton protobuf classes (the
reference parser) on generated messages, field soups and arbitrary or damaged bytes."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import tritonclient.grpc.service_pb2 as spb
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.serving.wire import (
    MAX_FIELDS,
    InferHeader,
    MalformedMessage,
    read_header,
    read_stream_response,
    rename_response,
    rewrite_stream_response,
    route_request,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.text(max_size=40)
tensors = st.builds(
    spb.ModelInferRequest.InferInputTensor,
    name=names,
    datatype=st.sampled_from(["FP32", "INT64", "BYTES", ""]),
    shape=st.lists(st.integers(-1, 2**40), max_size=4),
)


@st.composite
def infer_requests(draw: st.DrawFn) -> spb.ModelInferRequest:
    request = spb.ModelInferRequest(model_name=draw(names), model_version=draw(names), id=draw(names))
    request.inputs.extend(draw(st.lists(tensors, max_size=3)))
    for key in draw(st.lists(names, max_size=2)):
        request.parameters[key].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=300), max_size=3)))
    return request


def _parse(message_type: type[Message], data: bytes) -> Any:
    try:
        return message_type.FromString(data)
    except DecodeError:
        return None


def _header_of(message: spb.ModelInferRequest | spb.ModelInferResponse) -> InferHeader:
    return InferHeader(message.model_name, message.model_version, message.id)


# -- field soups: any mix of wire types and field numbers, duplicates of the fields the gateway reads ----------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: Numbers of the embedded-message fields of ModelInferRequest: the reference parser also parses their contents.
_MESSAGE_FIELDS = (4, 5, 6)


@st.composite
def fields(draw: st.DrawFn, depth: int = 0) -> bytes:
    """One field of any wire type (length-delimited ones never in an embedded-message field)."""
    number = draw(st.one_of(st.integers(1, 20), st.integers(1, 2**29 - 1)))
    kinds = ["varint", "fixed64", "fixed32", "group"] if depth < 2 else ["varint"]
    if number not in _MESSAGE_FIELDS:
        kinds += ["string", "bytes"]
    kind = draw(st.sampled_from(kinds))
    if kind == "varint":
        return _varint(number << 3) + _varint(draw(st.integers(0, 2**64 - 1)))
    if kind == "fixed64":
        return _varint(number << 3 | 1) + draw(st.binary(min_size=8, max_size=8))
    if kind == "fixed32":
        return _varint(number << 3 | 5) + draw(st.binary(min_size=4, max_size=4))
    if kind == "group":
        inner = b"".join(draw(st.lists(fields(depth + 1), max_size=3)))
        return _varint(number << 3 | 3) + inner + _varint(number << 3 | 4)
    payload = draw(names).encode() if kind == "string" else draw(st.binary(max_size=40))
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@st.composite
def field_soups(draw: st.DrawFn) -> bytes:
    header_fields = st.builds(
        lambda number, text: _varint(number << 3 | 2) + _varint(len(text.encode())) + text.encode(),
        st.integers(1, 3),
        names,
    )
    return b"".join(draw(st.lists(st.one_of(fields(), header_fields), max_size=8)))


def _damaged(data: bytes, draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "insert"]))
    if not data:
        return draw(st.binary(max_size=20))
    at = draw(st.integers(0, len(data) - 1))
    if how == "truncate":
        return data[:at]
    if how == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    return data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]


@st.composite
def damaged_messages(draw: st.DrawFn) -> bytes:
    source = draw(st.one_of(infer_requests().map(lambda m: m.SerializeToString()), field_soups()))
    return _damaged(source, draw)


# -- properties ------------------------------------------------------------------------------------------


@FAST
@given(infer_requests())
def test_the_header_of_a_request_is_what_the_reference_parser_reads(request: spb.ModelInferRequest) -> None:
    assert read_header(request.SerializeToString()) == _header_of(request)


@FAST
@given(infer_requests(), names, names)
def test_routing_a_request_changes_its_model_and_version_and_nothing_else(
    request: spb.ModelInferRequest, model: str, version: str
) -> None:
    routed = spb.ModelInferRequest.FromString(route_request(request.SerializeToString(), model, version))
    expected = spb.ModelInferRequest()
    expected.CopyFrom(request)
    expected.model_name, expected.model_version = model, version
    assert routed == expected


@FAST
@given(field_soups())
@example(b"\x0a\x01a\x0a\x01b")  # the last occurrence wins
@example(b"\x0b\x0a\x01x\x0c\x0a\x01y")  # a field inside a group is not the message's
@example(b"\x0d\x00\x00\x00\x00\x0a\x01a")  # field 1 with a foreign wire type is an unknown field
@example(b"\x08" + b"\xff" * 9 + b"\x7f")  # a ten-byte varint
@example(b"\x8a\x80\x00\x01a")  # an overlong but valid tag
def test_any_well_formed_field_soup_reads_as_the_reference_parser_reads_it(data: bytes) -> None:
    parsed = _parse(spb.ModelInferRequest, data)
    if parsed is None:
        with pytest.raises(MalformedMessage):
            read_header(data)
        return
    assert read_header(data) == _header_of(parsed)


@FAST
@given(st.one_of(st.binary(max_size=200), damaged_messages()))
@example(b"\x0b")  # unterminated group
@example(b"\x0c")  # end of a group that never started
@example(b"\x00")  # field number 0
@example(b"\x0e")  # wire type 6
@example(b"\x0a\x01\xff")  # model_name not UTF-8
@example(b"\x08" + b"\xff" * 10 + b"\x01")  # an eleven-byte varint
@example(b"\x80\x80\x80\x80\x10\x00")  # a tag beyond 32 bits
@example(b"\x0a\x05ab")  # a length past the end
@example(b"\x43" * 100 + b"\x44" * 100)  # groups as deep as protobuf allows
@example(b"\x43" * 101 + b"\x44" * 101)  # one deeper
@example(b"\x43" * 5000 + b"\x44" * 5000)  # far deeper: refused before Python's recursion limit
def test_arbitrary_bytes_are_read_like_the_reference_parser_or_refused_as_invalid_argument(data: bytes) -> None:
    parsed = _parse(spb.ModelInferRequest, data)
    try:
        header = read_header(data)
    except MalformedMessage as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT and exc.message.startswith("malformed message")
        # Only the reference parser may be stricter (it also checks the tensors), never this reader.
        assert parsed is None
        return
    if parsed is not None:
        assert header == _header_of(parsed)
    routed = _parse(spb.ModelInferRequest, route_request(data, "acme__bert", "7"))
    # What a parser makes of the routed bytes names Triton's model, or it refuses them as the original.
    assert (routed is None) == (parsed is None)
    if routed is not None:
        assert (routed.model_name, routed.model_version) == ("acme__bert", "7")


@FAST
@given(names, names, names, st.lists(st.binary(max_size=100), max_size=3), names)
def test_renaming_a_response_changes_only_its_model_name(
    model: str, version: str, request_id: str, outputs: list[bytes], tenant_name: str
) -> None:
    response = spb.ModelInferResponse(
        model_name=model, model_version=version, id=request_id, raw_output_contents=outputs
    )
    renamed = spb.ModelInferResponse.FromString(rename_response(response.SerializeToString(), tenant_name))
    response.model_name = tenant_name
    assert renamed == response


@FAST
@given(names, names, names, names, st.booleans(), names, names)
def test_stream_responses_are_read_and_rewritten_like_the_reference_parser(
    error: str, model: str, version: str, request_id: str, with_response: bool, tenant_name: str, tenant_id: str
) -> None:
    message = spb.ModelStreamInferResponse(error_message=error)
    if with_response:
        message.infer_response.CopyFrom(
            spb.ModelInferResponse(model_name=model, model_version=version, id=request_id, raw_output_contents=[b"x"])
        )
    data = message.SerializeToString()
    assert read_stream_response(data) == (error, _header_of(message.infer_response))
    rewritten = spb.ModelStreamInferResponse.FromString(rewrite_stream_response(data, tenant_name, tenant_id))
    message.infer_response.model_name, message.infer_response.id = tenant_name, tenant_id
    assert rewritten == message


@FAST
@given(st.one_of(st.binary(max_size=200), damaged_messages()))
def test_a_damaged_stream_response_is_refused_as_invalid_argument_or_read_as_the_reference_parser_does(
    data: bytes,
) -> None:
    parsed = _parse(spb.ModelStreamInferResponse, data)
    try:
        error, header = read_stream_response(data)
    except MalformedMessage:
        assert parsed is None
        return
    if parsed is not None:
        assert (error, header) == (parsed.error_message, _header_of(parsed.infer_response))


def test_a_message_of_countless_tiny_fields_is_refused_at_once() -> None:
    tiny = b"\x40\x00"  # field 8, varint 0
    assert read_header(tiny * MAX_FIELDS) == InferHeader("", "", "")
    with pytest.raises(MalformedMessage, match=f"more than {MAX_FIELDS} fields"):
        read_header(tiny * 5_000_000)  # 10 MB of them would hold the event loop for seconds
    # Refused at the first field too many, without reading on: 10 MB of garbage after it would be refused as garbage
    # (after a scan of it all) if the parser went further. (The cost itself: tests/bench/bench_request_limits.py.)
    with pytest.raises(MalformedMessage, match=f"more than {MAX_FIELDS} fields"):
        read_header(tiny * (MAX_FIELDS + 1) + b"\x07" * 10_000_000)
    with pytest.raises(MalformedMessage, match="field number 0|wire type"):
        read_header(tiny * (MAX_FIELDS - 1) + b"\x07" * 10_000_000)  # the garbage within the limit: read
    with pytest.raises(MalformedMessage, match="fields"):
        read_header(b"\x43" + tiny * MAX_FIELDS + b"\x44")  # inside a group too
