"""Request size limits: every message is bounded in bytes (AIDC_MAX_MESSAGE_BYTES); every repeated field and map of
every request of every service is bounded (256 items, or the field's ``(aidc.common.v1.max_items)`` option), and a
request over a bound is refused with INVALID_ARGUMENT naming the field before any servicer sees it — through a real
grpc.aio server for unary and client-streaming RPCs, and for every bounded field of every service's contract."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from services.gen.aidc.auth.v1 import auth_service_pb2
from services.gen.aidc.billing.v1 import billing_service_pb2
from services.gen.aidc.common.v1 import common_pb2
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2
from services.gen.aidc.serving.v1 import serving_service_pb2
from services.gen.aidc.storage.v1 import storage_service_pb2
from services.gen.aidc.training.v1 import training_service_pb2
from services.mesh.channels import create_channel
from services.mesh.errors import InvalidArgument
from services.mesh.limits import DEFAULT_MAX_ITEMS, RequestLimits
from services.mesh.security import secured_server
from tests.conftest import RunningAuth
from tests.mesh.echo import PERMISSIONS, Batch, EchoClient, Req, registration

_CONTRACTS = (
    auth_service_pb2,
    billing_service_pb2,
    scheduler_service_pb2,
    serving_service_pb2,
    storage_service_pb2,
    training_service_pb2,
)


def _request_types() -> list[Descriptor]:
    found: dict[str, Descriptor] = {}
    for module in _CONTRACTS:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found[method.input_type.full_name] = method.input_type
    return [found[name] for name in sorted(found)]


def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def _element_type(f: FieldDescriptor) -> Descriptor | None:
    return f.message_type.fields_by_name["value"].message_type if _is_map(f) else f.message_type


def _bounded_paths(descriptor: Descriptor, prefix: tuple[FieldDescriptor, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every repeated field and map reachable from a message type, as the chain of fields leading to it."""
    seen = {f.containing_type.full_name for f in prefix} | {descriptor.full_name}
    for f in descriptor.fields:
        if f.is_repeated:
            yield (*prefix, f)
        inner = _element_type(f)
        if inner is not None and inner.full_name not in seen:
            yield from _bounded_paths(inner, (*prefix, f))


def _limit(f: FieldDescriptor) -> int:
    options = f.GetOptions()
    return options.Extensions[common_pb2.max_items] if options.HasExtension(common_pb2.max_items) else DEFAULT_MAX_ITEMS


def _scalar(f: FieldDescriptor) -> Any:
    if f.type == FieldDescriptor.TYPE_STRING:
        return ""
    if f.type == FieldDescriptor.TYPE_BYTES:
        return b""
    if f.type == FieldDescriptor.TYPE_BOOL:
        return False
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return 0.0
    return 0


def _key(f: FieldDescriptor, index: int) -> Any:
    key = f.message_type.fields_by_name["key"]
    return str(index) if key.type == FieldDescriptor.TYPE_STRING else index


def _request_with(descriptor: Descriptor, path: tuple[FieldDescriptor, ...], count: int) -> tuple[Message, str]:
    """A request whose field at ``path`` holds ``count`` items, and how a refusal names that field."""
    request = GetMessageClass(descriptor)()
    message: Any = request
    names = []
    for step in path[:-1]:
        container = getattr(message, step.name)
        if _is_map(step):
            message, names = container[_key(step, 0)], [*names, f"{step.name}[{_key(step, 0)!r}]"]
        elif step.is_repeated:
            message, names = container.add(), [*names, f"{step.name}[0]"]
        else:
            container.SetInParent()
            message, names = container, [*names, step.name]
    target = path[-1]
    container = getattr(message, target.name)
    value = target.message_type.fields_by_name["value"] if _is_map(target) else target
    for index in range(count):
        if _is_map(target):
            if value.message_type is not None:
                container[_key(target, index)].SetInParent()
            else:
                container[_key(target, index)] = _scalar(value)
        elif target.message_type is not None:
            container.add()
        else:
            container.append(_scalar(target))
    return request, ".".join([*names, target.name])


_CASES = [
    pytest.param(descriptor, path, id=f"{descriptor.full_name}.{'.'.join(f.name for f in path)}")
    for descriptor in _request_types()
    for path in _bounded_paths(descriptor)
]


def test_every_request_type_of_every_service_is_covered() -> None:
    """The table below is not empty by accident: the contracts have bounded fields at several depths."""
    names = {param.id for param in _CASES}
    assert "aidc.auth.v1.BatchCheckPermissionRequest.checks" in names
    assert "aidc.billing.v1.RecordUsageRequest.events.attributes" in names
    assert "aidc.billing.v1.SetPriceBookRequest.price_book.plans.prices.tiers" in names
    assert "aidc.storage.v1.UploadRequest.header.metadata" in names
    assert len(names) == len(_CASES) >= 25


@pytest.mark.parametrize(("descriptor", "path"), _CASES)
def test_each_repeated_field_and_map_is_bounded(descriptor: Descriptor, path: tuple[FieldDescriptor, ...]) -> None:
    limits = RequestLimits()
    limit = _limit(path[-1])
    at_limit, _ = _request_with(descriptor, path, limit)
    limits.check(at_limit)
    over, name = _request_with(descriptor, path, limit + 1)
    with pytest.raises(InvalidArgument) as refused:
        limits.check(over)
    assert str(refused.value) == f"{name} holds {limit + 1} items; at most {limit} are allowed"


def test_contract_overrides_are_the_ones_services_need() -> None:
    """Batches the mesh itself sends (usage events, permission checks) may hold 1,000; the rest the default."""
    batch = auth_service_pb2.BatchCheckPermissionRequest.DESCRIPTOR.fields_by_name["checks"]
    events = billing_service_pb2.RecordUsageRequest.DESCRIPTOR.fields_by_name["events"]
    roles = auth_service_pb2.CreateUserRequest.DESCRIPTOR.fields_by_name["roles"]
    assert (_limit(batch), _limit(events), _limit(roles)) == (1000, 1000, DEFAULT_MAX_ITEMS)


def _batch(count: int) -> Batch:
    return Batch(checks=[auth_service_pb2.PermissionCheck(subject=f"user:t/u{i}") for i in range(count)])


@pytest.fixture
async def echo(auth: RunningAuth) -> AsyncIterator[EchoClient]:
    server = secured_server("echo", auth.settings, [registration()], PERMISSIONS, address="127.0.0.1:0")
    port = await server.start()
    await server.wait_ready()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield EchoClient(channel)
    await channel.close()
    await server.stop(0)


async def test_unary_request_over_a_bound_is_refused_before_the_servicer(echo: EchoClient) -> None:
    assert (await echo.count()(_batch(1000))).tenant.name == "counted 1000"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await echo.count()(_batch(1001))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "checks holds 1001 items; at most 1000 are allowed"


async def test_every_message_of_a_request_stream_is_checked(echo: EchoClient) -> None:
    assert (await echo.count(streaming=True)(iter([_batch(1000), _batch(1000)]))).tenant.name == "counted 2000"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await echo.count(streaming=True)(iter([_batch(3), _batch(1000), _batch(1001)]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "checks holds 1001 items" in (refused.value.details() or "")


async def test_auth_refuses_oversized_requests_and_changes_nothing(auth: RunningAuth) -> None:
    """Through the real auth service: a user with 257 roles is not created, a batch of 1,001 checks not run."""
    token = (await auth.client().login("platform", "admin", auth.admin_password)).access_token
    admin = auth.client(token)
    await admin.create_tenant("acme")
    stub = admin.stub
    roles = ["developer"] * (DEFAULT_MAX_ITEMS + 1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateUser(auth_service_pb2.CreateUserRequest(tenant="acme", name="bob", roles=roles))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    limit = DEFAULT_MAX_ITEMS
    assert refused.value.details() == f"roles holds {limit + 1} items; at most {limit} are allowed"
    listed = await stub.ListUsers(auth_service_pb2.ListUsersRequest(tenant="acme"))
    assert [u.name for u in listed.users] == []
    checks = [auth_service_pb2.PermissionCheck(tenant="acme", resource="datasets", action="read")] * 1001
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.BatchCheckPermission(auth_service_pb2.BatchCheckPermissionRequest(checks=checks))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "checks holds 1001 items; at most 1000" in (refused.value.details() or "")
    allowed = await stub.BatchCheckPermission(auth_service_pb2.BatchCheckPermissionRequest(checks=checks[:1000]))
    assert list(allowed.allowed) == [True] * 1000
    await admin.close()


async def test_messages_over_aidc_max_message_bytes_are_refused_and_the_default_admits_64_mib(
    auth: RunningAuth,
) -> None:
    """AIDC_MAX_MESSAGE_BYTES bounds what a service receives and what its mesh channels send: above it gRPC refuses
    with RESOURCE_EXHAUSTED before any servicer runs. The default (64 MiB) admits what gRPC's own 4 MiB would not."""
    limit = 64 * 1024
    small = replace(auth.settings, max_message_bytes=limit)
    for settings, admitted, refused in ((small, limit - 1024, limit + 1024), (auth.settings, 5 * 2**20, None)):
        server = secured_server("echo", settings, [registration()], PERMISSIONS, address="127.0.0.1:0")
        port = await server.start()
        await server.wait_ready()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:  # no limit of its own
                call = EchoClient(channel).unary("Raise")
                assert (await call(Req(tenant="x" * admitted), timeout=30)).tenant.name == "ok"
                if refused is not None:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call(Req(tenant="x" * refused), timeout=30)
                    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "larger than max" in (caught.value.details() or "")
            if refused is not None:  # a mesh channel with the same setting does not even send it
                async with create_channel(f"127.0.0.1:{port}", settings) as channel:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await EchoClient(channel).unary("Raise")(Req(tenant="x" * refused), timeout=30)
                    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await server.stop(0)
