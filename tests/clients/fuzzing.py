"""Request generation for fuzzing every RPC from its descriptor, and each service's state as its read RPCs show it.

Requests are built field by field from the request type's descriptor: random values of each field's type, strings
that look like the platform's own names and ids (and like attacks on them), huge strings, repeated fields and maps past
the size limits, unknown enum numbers, nested messages; and as raw bytes: truncated messages, garbage, fields sent
with the wrong wire type.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from hypothesis import strategies as st

#: Strings that are ids, names and paths of the platform, or attacks on them.
NASTY = (
    "",
    " ",
    "0",
    "-1",
    "9223372036854775808",
    "00000000-0000-0000-0000-000000000000",
    "not-a-uuid",
    "../../../etc/passwd",
    "acme/../globex",
    "a/b/c",
    "' OR 1=1 --",
    "%s%n",
    "\x00",
    "\u202e\u0000\ud7ff",
    "名字",
    "user:globex/dev",
    "service:billing",
    "sa:acme/robot",
    "aidc_0000_secret",
    "eyJhbGciOiJub25lIn0.e30.",
    "s3://bucket/../x",
    "*",
)
#: Huge strings: past every name limit, far below the message size limit.
HUGE = (1_000, 70_000)
#: Past the default limit of 256 items per repeated field or map (and past declared limits of 1,000).
LONG = (257, 1_001)
_MAX_DEPTH = 3


@dataclass(frozen=True)
class Hints:
    """Values that make requests reach deeper than random text would: tenants and names that exist."""

    tenants: Sequence[str]
    names: Sequence[str]


def message_class(descriptor: Descriptor) -> Any:
    return message_factory.GetMessageClass(descriptor)


def method_descriptor(full_method: str) -> MethodDescriptor:
    """The descriptor of "/package.Service/Method"."""
    return descriptor_pool.Default().FindMethodByName(full_method.lstrip("/").replace("/", "."))


def _strings(field: FieldDescriptor, hints: Hints, depth: int) -> st.SearchStrategy[str]:
    hinted: list[str] = list(NASTY)
    if field.name in ("tenant", "tenant_id") or field.name.endswith("_tenant"):
        hinted = [*hints.tenants, *hinted]
    elif "name" in field.name or field.name in ("model", "dataset", "base_model", "alias", "pool", "node"):
        hinted = [*hints.names, *hinted]
    choices = [st.sampled_from(hinted), st.text(max_size=40)]
    if depth == 0:  # huge strings at the top level only: nested in long lists they would multiply
        choices.append(st.sampled_from(HUGE).map(lambda n: "x" * n))
    return st.one_of(*choices)


def _count(depth: int) -> st.SearchStrategy[int]:
    """How many items a repeated field or map gets: past the limits at the top level only (a long list of messages
    each holding long lists would grow without bound)."""
    return st.one_of(st.integers(0, 3), st.sampled_from(LONG)) if depth == 0 else st.integers(0, 2)


_INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor, hints: Hints, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return _strings(field, hints, depth)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-3, 10_000))  # unknown numbers too
    if kind in _INTS:
        low, high = _INTS[kind]
        return st.one_of(st.integers(low, high), st.sampled_from([0, 1, -1 if low < 0 else 2, low, high]))
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, hints, depth + 1)
    raise TypeError(f"no strategy for field {field.full_name} of type {kind}")


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, hints: Hints, depth: int = 0) -> Any:
    """A message of ``descriptor``'s type with random fields set (some left unset, oneofs as drawn)."""
    message = message_class(descriptor)()
    if depth > _MAX_DEPTH:
        return message
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if _is_map(field):
            key_field, value_field = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            count = draw(_count(depth))
            keys = draw(st.lists(_scalar(key_field, hints, depth + 1), min_size=min(count, 3), max_size=min(count, 3)))
            keys += [f"k{i}" if key_field.type == FieldDescriptor.TYPE_STRING else i for i in range(count - len(keys))]
            target = getattr(message, field.name)
            for key in keys:
                value = draw(_scalar(value_field, hints, depth + 1))
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    target[key].CopyFrom(value)
                else:
                    target[key] = value
        elif field.is_repeated:
            count = draw(_count(depth))
            items = draw(st.lists(_scalar(field, hints, depth + 1), min_size=min(count, 3), max_size=min(count, 3)))
            items += items[-1:] * (count - len(items)) if items else []
            target = getattr(message, field.name)
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for item in items:
                    target.add().CopyFrom(item)
            else:
                target.extend(items)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(draw(_scalar(field, hints, depth)))
        else:
            setattr(message, field.name, draw(_scalar(field, hints, depth)))
    return message


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@st.composite
def request_bytes(draw: st.DrawFn, descriptor: Descriptor, hints: Hints) -> tuple[str, bytes]:
    """(how it was made, the bytes of one request message)."""
    how = draw(st.sampled_from(("message", "message", "message", "truncated", "garbage", "wrong wire type")))
    if how == "garbage":
        return how, draw(st.binary(min_size=1, max_size=64))
    data = draw(messages(descriptor, hints)).SerializeToString()
    if how == "truncated" and len(data) > 1:
        return how, data[: draw(st.integers(1, len(data) - 1))]
    if how == "wrong wire type" and descriptor.fields:
        field = draw(st.sampled_from(list(descriptor.fields)))
        # A length-delimited field sent as a varint and a varint one as bytes: what a client with the wrong idea of
        # the type (an id as a number) sends.
        wire = 0 if field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE) else 2
        value = _varint(draw(st.integers(0, 2**40))) if wire == 0 else _varint(3) + b"abc"
        return how, data + _varint(field.number << 3 | wire) + value
    return "message", data


# -- each service's state, as its read RPCs show it to a platform admin ------------------------------------------------


#: (method, request) pairs per service whose answers must not change when a request is refused. Audit logs, usage and
#: budgets are left out: refused logins are audited, and usage arrives on its own schedule.
def state_reads(tenants: Sequence[str]) -> dict[str, list[tuple[str, Any]]]:
    def request(method: str, **fields: Any) -> tuple[str, Any]:
        return method, message_class(method_descriptor(method).input_type)(**fields)

    auth, storage, training = (
        "/aidc.auth.v1.AuthService",
        "/aidc.storage.v1.StorageService",
        "/aidc.training.v1.TrainingService",
    )
    scheduler, billing = "/aidc.scheduler.v1.SchedulerService", "/aidc.billing.v1.BillingService"
    serving = "/aidc.serving.v1.ServingService"
    reads: dict[str, list[tuple[str, Any]]] = {
        "auth": [request(f"{auth}/ListTenants"), request(f"{auth}/GetJwks")],
        "storage": [],
        "training": [],
        "scheduler": [request(f"{scheduler}/ListPools", tenant="platform")],
        "billing": [request(f"{billing}/GetPriceBook")],
        "serving": [],
    }
    for tenant in tenants:
        reads["auth"] += [
            request(f"{auth}/ListUsers", tenant=tenant),
            request(f"{auth}/ListApiKeys", tenant=tenant),
            request(f"{auth}/ListRoleBindings", tenant=tenant),
        ]
        reads["storage"] += [request(f"{storage}/List", tenant=tenant, all_versions=True)]
        reads["training"] += [
            request(f"{training}/ListJobs", tenant=tenant),
            request(f"{training}/ListModels", tenant=tenant),
            request(f"{training}/ListBaseModels", tenant=tenant),
        ]
        reads["scheduler"] += [
            request(f"{scheduler}/ListJobs", tenant=tenant),
            request(f"{scheduler}/GetQuota", tenant=tenant),
        ]
        reads["billing"] += [request(f"{billing}/ListInvoices", tenant=tenant)]
        reads["serving"] += [request(f"{serving}/ListDeployments", tenant=tenant)]
    return reads


def state_digest(
    channel_of: Callable[[str], grpc.Channel], reads: list[tuple[str, Any]], service: str, token: str
) -> str:
    """SHA-256 over the deterministic serializations of the answers to ``reads``."""
    digest = hashlib.sha256()
    for method, request in reads:
        call = channel_of(service).unary_unary(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=message_class(method_descriptor(method).output_type).FromString,
        )
        reply = call(request, metadata=(("authorization", f"Bearer {token}"),), timeout=30)
        digest.update(method.encode() + reply.SerializeToString(deterministic=True))
    return digest.hexdigest()
