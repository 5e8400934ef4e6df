"""Stand-in servicers for every RPC of the aidc contract, served under the services' real permission tables.

A fake only where the real part is beside the point: these handlers answer each RPC with an empty response of its
declared type and remember who called (the principal and the peer service the interceptors established), so a test
can run the mesh runtime's authentication and mesh-only refusals for every RPC of every service through one real
server, without starting six services.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor

from services.mesh.authz import PermissionTable
from services.mesh.config import SERVICE_NAMES
from services.mesh.identity import current_peer_service, current_principal
from services.mesh.server import Registration


def service_tables() -> dict[str, PermissionTable]:
    """The permission table of every service that has one, by service name."""
    tables = {}
    for name in SERVICE_NAMES:
        try:
            tables[name] = importlib.import_module(f"services.{name}.permissions").PERMISSIONS
        except ModuleNotFoundError:
            continue
    return tables


def all_rules() -> PermissionTable:
    """Every service's table merged: full method name -> rule."""
    merged = PermissionTable({})
    for table in service_tables().values():
        merged = merged.merged(table)
    return merged


def method_descriptor(method: str) -> MethodDescriptor:
    """The descriptor of "/package.Service/Method"."""
    return descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", "."))


def message_class(descriptor: Any) -> Any:
    return message_factory.GetMessageClass(descriptor)


@dataclass
class Calls:
    """What reached the stand-in handlers: (method, subject or None, peer service or None)."""

    seen: list[tuple[str, str | None, str | None]] = field(default_factory=list)

    def record(self, method: str) -> None:
        principal = current_principal.get()
        self.seen.append((method, principal.subject if principal else None, current_peer_service.get()))


def _handler(method: str, calls: Calls) -> grpc.RpcMethodHandler:
    descriptor = method_descriptor(method)
    request, response = message_class(descriptor.input_type), message_class(descriptor.output_type)
    kwargs = {"request_deserializer": request.FromString, "response_serializer": response.SerializeToString}

    async def unary(_request: Any, _context: Any) -> Any:
        calls.record(method)
        return response()

    async def drain(requests: AsyncIterator[Any]) -> None:
        async for _ in requests:
            pass

    async def stream_unary(requests: AsyncIterator[Any], _context: Any) -> Any:
        await drain(requests)
        calls.record(method)
        return response()

    async def unary_stream(_request: Any, _context: Any) -> AsyncIterator[Any]:
        calls.record(method)
        yield response()

    async def stream_stream(requests: AsyncIterator[Any], _context: Any) -> AsyncIterator[Any]:
        await drain(requests)
        calls.record(method)
        yield response()

    if descriptor.client_streaming and descriptor.server_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)
    if descriptor.client_streaming:
        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    if descriptor.server_streaming:
        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)


def registrations(table: PermissionTable, calls: Calls) -> list[Registration]:
    """One generic handler per gRPC service of ``table``, answering each of its RPCs."""
    by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for method, _ in table.items():
        service, _, name = method.lstrip("/").partition("/")
        by_service.setdefault(service, {})[name] = _handler(method, calls)
    out = []
    for service, handlers in by_service.items():
        generic = grpc.method_handlers_generic_handler(service, handlers)
        out.append(Registration(service, lambda server, g=generic: server.add_generic_rpc_handlers((g,))))
    return out
