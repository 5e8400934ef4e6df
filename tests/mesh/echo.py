"""A tiny gRPC service for testing the mesh runtime through a real server: its handlers raise chosen errors,
echo the caller, and need chosen permissions. Messages reuse auth's GetTenantRequest/Response (they have a
``tenant`` field, which is all the authorization interceptor reads); the Count RPCs take auth's
BatchCheckPermissionRequest, whose repeated ``checks`` field the request limits bound."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.gen.aidc.auth.v1.auth_service_pb2 import BatchCheckPermissionRequest as Batch
from services.gen.aidc.auth.v1.auth_service_pb2 import GetTenantRequest as Req
from services.gen.aidc.auth.v1.auth_service_pb2 import GetTenantResponse as Resp
from services.gen.aidc.auth.v1.auth_service_pb2 import Tenant
from services.mesh import errors
from services.mesh.authz import PermissionTable, authenticated, public, tenant_rule
from services.mesh.identity import current_principal
from services.mesh.interceptors import current_deadline
from services.mesh.server import Registration

SERVICE = "test.v1.Echo"

ERRORS: dict[str, type[errors.AidcError]] = {
    cls.__name__: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.AlreadyExists,
        errors.PermissionDenied,
        errors.Unauthenticated,
        errors.FailedPrecondition,
        errors.QuotaExceeded,
        errors.Aborted,
        errors.Unavailable,
        errors.DeadlineExceeded,
        errors.DataLoss,
        errors.Unimplemented,
    )
}

PERMISSIONS = PermissionTable(
    {
        f"/{SERVICE}/Raise": public(),
        f"/{SERVICE}/RaiseStream": public(),
        f"/{SERVICE}/WhoAmI": authenticated(),
        f"/{SERVICE}/ReadDatasets": tenant_rule("datasets", "read"),
        f"/{SERVICE}/UploadDataset": tenant_rule("datasets", "write"),
        f"/{SERVICE}/Count": public(),
        f"/{SERVICE}/CountStream": public(),
        # "/test.v1.Echo/Unlisted" is deliberately missing.
    }
)


def _reply(text: str) -> Resp:
    return Resp(tenant=Tenant(name=text))


#: Keys of "cut-off-once:<key>" calls already cut off (each is cut off once, then answered).
_CUT_OFF: set[str] = set()


async def _raise(request: Req, context: Any) -> Resp:
    kind = request.tenant
    if kind.startswith("cut-off-once:") and kind not in _CUT_OFF:
        _CUT_OFF.add(kind)  # ended with CANCELLED, as a server stopping past its grace period ends a call
        await context.abort(grpc.StatusCode.CANCELLED, "")
    if kind.startswith("NotFound:"):  # a message quoting the caller's input, as services' messages do
        raise errors.NotFound(f"no such thing: {kind}")
    if kind in ERRORS:
        raise ERRORS[kind](f"{kind} raised on purpose")
    if kind == "boom":
        raise RuntimeError("secret internals: password=hunter2 at /srv/db.sqlite")
    return _reply("ok")


async def _raise_stream(request: Req, context: Any) -> AsyncIterator[Resp]:
    yield _reply("first")
    if request.tenant in ERRORS:
        raise ERRORS[request.tenant]("failed mid-stream")
    raise RuntimeError("secret stream internals")


async def _whoami(request: Req, context: Any) -> Resp:
    principal = current_principal.get()
    deadline = current_deadline.get()
    return _reply(f"{principal.subject if principal else '-'}|{'deadline' if deadline else 'none'}")


async def _read(request: Req, context: Any) -> Resp:
    return _reply(f"read {request.tenant}")


async def _upload(requests: AsyncIterator[Req], context: Any) -> Resp:
    count = 0
    async for _ in requests:
        count += 1
    return _reply(f"received {count}")


async def _count(request: Batch, context: Any) -> Resp:
    return _reply(f"counted {len(request.checks)}")


async def _count_stream(requests: AsyncIterator[Batch], context: Any) -> Resp:
    total = 0
    async for request in requests:
        total += len(request.checks)
    return _reply(f"counted {total}")


def _unary(fn: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=Req.FromString, response_serializer=Resp.SerializeToString
    )


def registration() -> Registration:
    handlers = {
        "Raise": _unary(_raise),
        "RaiseStream": grpc.unary_stream_rpc_method_handler(
            _raise_stream, request_deserializer=Req.FromString, response_serializer=Resp.SerializeToString
        ),
        "WhoAmI": _unary(_whoami),
        "ReadDatasets": _unary(_read),
        "Unlisted": _unary(_read),
        "UploadDataset": grpc.stream_unary_rpc_method_handler(
            _upload, request_deserializer=Req.FromString, response_serializer=Resp.SerializeToString
        ),
        "Count": grpc.unary_unary_rpc_method_handler(
            _count, request_deserializer=Batch.FromString, response_serializer=Resp.SerializeToString
        ),
        "CountStream": grpc.stream_unary_rpc_method_handler(
            _count_stream, request_deserializer=Batch.FromString, response_serializer=Resp.SerializeToString
        ),
    }
    generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
    return Registration(SERVICE, lambda server: server.add_generic_rpc_handlers((generic,)))


class EchoClient:
    """Raw calls to the echo service."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def unary(self, method: str) -> Any:
        return self._channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=Req.SerializeToString,
            response_deserializer=Resp.FromString,
        )

    def stream(self, method: str) -> Any:
        return self._channel.unary_stream(
            f"/{SERVICE}/{method}",
            request_serializer=Req.SerializeToString,
            response_deserializer=Resp.FromString,
        )

    def count(self, streaming: bool = False) -> Any:
        call = self._channel.stream_unary if streaming else self._channel.unary_unary
        return call(
            f"/{SERVICE}/CountStream" if streaming else f"/{SERVICE}/Count",
            request_serializer=Batch.SerializeToString,
            response_deserializer=Resp.FromString,
        )

    def upload(self) -> Any:
        return self._channel.stream_unary(
            f"/{SERVICE}/UploadDataset",
            request_serializer=Req.SerializeToString,
            response_deserializer=Resp.FromString,
        )
