"""The server interceptors every service runs, outermost first: tracing, error mapping, deadlines, request size
limits, authentication, authorization. Each wraps the RPC's behavior; none knows about any particular service.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError
from grpc.aio import ServicerContext
from opentelemetry import trace

from services.mesh.authz import PermissionChecker, PermissionTable, Scope, decide_scope_tenant
from services.mesh.certs import SERVICE_URI_PREFIX
from services.mesh.config import SERVICE_NAMES
from services.mesh.errors import (
    STATUS_DETAILS_KEY,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    status_details,
    status_for,
)
from services.mesh.identity import (
    PLATFORM_TENANT,
    Principal,
    TokenVerifier,
    bearer_token,
    current_peer_service,
    current_principal,
)
from services.mesh.limits import RequestLimits

__all__ = [
    "ErrorMappingInterceptor",
    "DeadlineInterceptor",
    "RequestLimitInterceptor",
    "AuthenticationInterceptor",
    "AuthorizationInterceptor",
    "current_deadline",
    "current_method",
    "FORWARDED_PEER",
]

log = logging.getLogger(__name__)

#: Monotonic time by which the RPC being served must finish (None: no deadline); client calls inherit it.
current_deadline: ContextVar[float | None] = ContextVar("aidc_current_deadline", default=None)
#: Full name of the RPC being served.
current_method: ContextVar[str] = ContextVar("aidc_current_method", default="")
#: Metadata a replica forwarding a call to its leader sends: the service the original caller's certificate named, or
#: "-" (services/mesh/forwarding.py). Trusted only from a certificate of the receiving service itself.
FORWARDED_PEER = "x-aidc-forwarded-peer"

Behavior = Callable[..., Any]
# A decorator receives the behavior, whether the request is a stream, whether the response is a stream,
# and the call details, and returns the new behavior of the same shape.
Decorator = Callable[[Behavior, bool, bool, grpc.HandlerCallDetails], Behavior]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _behavior_of(handler: grpc.RpcMethodHandler) -> Behavior:
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream  # type: ignore[return-value]
    )


def _rewrap(
    handler: grpc.RpcMethodHandler,
    details: grpc.HandlerCallDetails,
    decorate: Decorator,
    deserializer: Callable[[Any], Any] | None,
) -> Any:
    streams = (handler.request_streaming, handler.response_streaming)
    behavior = decorate(_behavior_of(handler), *streams, details)
    return _FACTORIES[streams](
        behavior,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


class _Undecodable:
    """Stands for request bytes that are not a message of the RPC's request type (grpc itself would answer UNKNOWN
    with the parser's exception text): the error-mapping interceptor refuses it with INVALID_ARGUMENT."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            return _Undecodable(error)

    return deserialize


def _refuse_undecodable(message: Any, method: str) -> Any:
    if isinstance(message, _Undecodable):
        raise InvalidArgument(f"the request is not a valid message of {method.lstrip('/').replace('/', '.')}'s type")
    return message


def _around(
    behavior: Behavior,
    request_streaming: bool,
    response_streaming: bool,
    before: Callable[[Any, ServicerContext], Awaitable[None]],
) -> Behavior:
    """Runs ``before(first_request_or_None, context)`` ahead of the behavior, for all four RPC shapes.

    For client-streaming RPCs the first message is read ahead (and then replayed), so rules can look at a
    request header that travels in the first message.
    """

    async def _peek(request_iterator: Any, context: ServicerContext) -> AsyncIterator[Any]:
        iterator = request_iterator.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            await before(None, context)
            return _empty()
        await before(first, context)
        return _chain(first, iterator)

    if not request_streaming and not response_streaming:

        async def unary_unary(request: Any, context: ServicerContext) -> Any:
            await before(request, context)
            return await behavior(request, context)

        return unary_unary
    if not request_streaming:

        async def unary_stream(request: Any, context: ServicerContext) -> AsyncIterator[Any]:
            await before(request, context)
            async for response in behavior(request, context):
                yield response

        return unary_stream
    if not response_streaming:

        async def stream_unary(request_iterator: Any, context: ServicerContext) -> Any:
            return await behavior(await _peek(request_iterator, context), context)

        return stream_unary

    async def stream_stream(request_iterator: Any, context: ServicerContext) -> AsyncIterator[Any]:
        async for response in behavior(await _peek(request_iterator, context), context):
            yield response

    return stream_stream


async def _empty() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover - makes this an async generator


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


class _WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Base: wraps every handler's behavior with ``self.decorate``, once per method (then cached)."""

    _wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]]

    @abstractmethod
    def decorate(
        self,
        behavior: Behavior,
        request_streaming: bool,
        response_streaming: bool,
        details: grpc.HandlerCallDetails,
    ) -> Behavior:
        """The new behavior of one RPC (same shape as ``behavior``)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        cache = self.__dict__.setdefault("_wrapped", {})
        method = handler_call_details.method
        wrapped = cache.get(method)
        if wrapped is None or wrapped[0] is not handler:
            deserializer = self.request_deserializer(handler.request_deserializer)
            wrapped = (handler, _rewrap(handler, handler_call_details, self.decorate, deserializer))
            cache[method] = wrapped
        return wrapped[1]  # type: ignore[no-any-return]

    def request_deserializer(self, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        """How request bytes become the message the behavior gets (unchanged by default)."""
        return deserializer


class ErrorMappingInterceptor(_WrappingInterceptor):
    """Turns exceptions into statuses: domain errors by the table in errors.py, anything else into INTERNAL
    with a generic message (logged once, with the trace id, never sent to the caller). Request bytes that do not
    decode as the RPC's request type are INVALID_ARGUMENT (each message of a request stream too)."""

    def request_deserializer(self, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        return None if deserializer is None else _tolerant(deserializer)

    def decorate(
        self,
        behavior: Behavior,
        request_streaming: bool,
        response_streaming: bool,
        details: grpc.HandlerCallDetails,
    ) -> Behavior:
        method = details.method

        async def fail(error: Exception, context: ServicerContext) -> None:
            code, message = status_for(error)
            if code == grpc.StatusCode.INTERNAL:
                log.error("unhandled error in %s", method, exc_info=error)
            else:
                log.info("%s -> %s: %s", method, code.name, message)
            details = status_details(error)
            await context.abort(code, message, ((STATUS_DETAILS_KEY, details),) if details is not None else ())

        def checked(request: Any) -> Any:
            """The request, or for a request stream an iterator refusing undecodable messages as they come."""
            if not request_streaming:
                return _refuse_undecodable(request, method)

            async def messages() -> AsyncIterator[Any]:
                async for message in request:
                    yield _refuse_undecodable(message, method)

            return messages()

        if response_streaming:

            async def streaming(request: Any, context: ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for response in behavior(checked(request), context):
                        yield response
                except (grpc.aio.AbortError, GeneratorExit):
                    raise
                except Exception as error:  # noqa: BLE001 - this is the one place errors become statuses
                    await fail(error, context)

            return streaming

        async def unary(request: Any, context: ServicerContext) -> Any:
            try:
                return await behavior(checked(request), context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001
                await fail(error, context)

        return unary


class DeadlineInterceptor(_WrappingInterceptor):
    """Records the caller's deadline and the method name so that outgoing calls inherit the deadline."""

    def decorate(
        self,
        behavior: Behavior,
        request_streaming: bool,
        response_streaming: bool,
        details: grpc.HandlerCallDetails,
    ) -> Behavior:
        method = details.method

        async def before(_request: Any, context: ServicerContext) -> None:
            remaining = context.time_remaining()
            current_deadline.set(None if remaining is None else time.monotonic() + remaining)
            current_method.set(method)

        return _around(behavior, request_streaming, response_streaming, before)


def _declared_request_type(method: str) -> Any:
    """The request type the contract declares for ``/package.Service/Method``; None when no loaded contract has it."""
    try:
        return descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", ".")).input_type
    except KeyError:
        return None


class RequestLimitInterceptor(_WrappingInterceptor):
    """Refuses, with INVALID_ARGUMENT naming the field, every request message (each message of a request stream)
    whose repeated fields or maps hold more items than ``RequestLimits`` allows.

    RPCs whose declared request type cannot hold any are not wrapped at all; pass-through handlers (the inference
    gateway forwards raw bytes) are not messages and pass unchecked.
    """

    def __init__(self, limits: RequestLimits | None = None) -> None:
        self._limits = limits or RequestLimits()

    def decorate(
        self,
        behavior: Behavior,
        request_streaming: bool,
        response_streaming: bool,
        details: grpc.HandlerCallDetails,
    ) -> Behavior:
        declared = _declared_request_type(details.method)
        if declared is not None and self._limits.plan_of(declared) is None:
            return behavior
        check = self._limits.check
        if not request_streaming:

            async def before(request: Any, _context: ServicerContext) -> None:
                check(request)

            return _around(behavior, request_streaming, response_streaming, before)

        async def checked(requests: Any) -> AsyncIterator[Any]:
            async for request in requests:
                check(request)
                yield request

        if response_streaming:

            async def stream_stream(requests: Any, context: ServicerContext) -> AsyncIterator[Any]:
                async for response in behavior(checked(requests), context):
                    yield response

            return stream_stream

        async def stream_unary(requests: Any, context: ServicerContext) -> Any:
            return await behavior(checked(requests), context)

        return stream_unary


def _peer_service(context: ServicerContext) -> str | None:
    """The mesh service a verified client certificate names by its URI ``spiffe://aidc/service/<service>``, if any.

    Only service certificates carry that URI (clients' carry ``spiffe://aidc/client/<name>``); the common name grants
    nothing, so no client certificate, whatever it is called, becomes a service identity.
    """
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    uris = list(auth.get("peer_spiffe_id") or ())
    if len(uris) != 1:
        return None
    uri = uris[0].decode()
    if not uri.startswith(SERVICE_URI_PREFIX):
        return None
    service = uri[len(SERVICE_URI_PREFIX) :]
    return service if service in SERVICE_NAMES else None


class AuthenticationInterceptor(_WrappingInterceptor):
    """Establishes the caller: a bearer token verified locally, or a mesh service's client certificate.

    Public RPCs (per the permission table) need neither; every other RPC without credentials is
    UNAUTHENTICATED. RPCs missing from the table are left to the authorization interceptor to refuse.

    On the tenant path (``tenant_path``: the listener tenants reach with a token and no client certificate) the
    connection's certificate is never looked at, so no service identity can be had there, and RPCs whose rule is
    ``mesh_only`` are refused with PERMISSION_DENIED before anything else.
    """

    def __init__(
        self, table: PermissionTable, verifier: TokenVerifier, *, tenant_path: bool = False, service: str = ""
    ) -> None:
        self._table = table
        self._verifier = verifier
        self._tenant_path = tenant_path
        self._service = service

    def decorate(
        self,
        behavior: Behavior,
        request_streaming: bool,
        response_streaming: bool,
        details: grpc.HandlerCallDetails,
    ) -> Behavior:
        rule = self._table.rule(details.method)
        is_public = rule is not None and rule.scope is Scope.PUBLIC
        verifier = self._verifier
        tenant_path = self._tenant_path
        if tenant_path and rule is not None and rule.mesh_only:
            refusal = f"{details.method} is for mesh services only: it is not served on the tenant endpoint"

            async def refuse(_request: Any, _context: ServicerContext) -> None:
                raise PermissionDenied(refusal)

            return _around(behavior, request_streaming, response_streaming, refuse)

        own_service = self._service

        async def before(_request: Any, context: ServicerContext) -> None:
            metadata = tuple(context.invocation_metadata() or ())
            token = bearer_token(metadata)
            service = None if tenant_path else _peer_service(context)
            if service is not None and service == own_service:
                # A replica of this service forwarding a call to its leader: the caller is the one it names.
                forwarded = next((str(value) for key, value in metadata if key == FORWARDED_PEER), None)
                if forwarded is not None:
                    service = forwarded if forwarded in SERVICE_NAMES else None
            current_peer_service.set(service)
            principal: Principal | None = None
            if token is not None:
                principal = await verifier.verify(token)
            elif service is not None:
                principal = Principal(subject=f"service:{service}", tenant=PLATFORM_TENANT, kind="service")
            if principal is None and not is_public:
                raise Unauthenticated("this call requires credentials: send 'authorization: Bearer <token>'")
            current_principal.set(principal)
            if principal is not None:
                trace.get_current_span().set_attribute("aidc.mesh.subject", principal.subject)

        return _around(behavior, request_streaming, response_streaming, before)


class AuthorizationInterceptor(_WrappingInterceptor):
    """Applies the permission table: refuses RPCs without a rule, checks (resource, action) rules through
    the permission checker in the request's tenant (or the platform scope)."""

    def __init__(self, table: PermissionTable, checker: PermissionChecker) -> None:
        self._table = table
        self._checker = checker

    def decorate(
        self,
        behavior: Behavior,
        request_streaming: bool,
        response_streaming: bool,
        details: grpc.HandlerCallDetails,
    ) -> Behavior:
        method = details.method
        rule = self._table.rule(method)
        checker = self._checker

        async def before(request: Any, _context: ServicerContext) -> None:
            if rule is None:
                log.warning("refused %s: it has no entry in the permission table", method)
                raise PermissionDenied(f"{method} is not open to any caller (no permission rule)")
            if rule.scope in (Scope.PUBLIC, Scope.AUTHENTICATED):
                return
            principal = current_principal.get()
            if principal is None:  # pragma: no cover - authentication runs first
                raise Unauthenticated("this call requires credentials")
            tenant = decide_scope_tenant(rule, request, principal.tenant)
            allowed = await checker.check(principal, tenant, rule.resource, rule.action)
            span = trace.get_current_span()
            span.set_attribute("aidc.mesh.tenant", tenant)
            span.set_attribute("aidc.mesh.permission", f"{rule.resource}:{rule.action}")
            span.set_attribute("aidc.mesh.allowed", allowed)
            if not allowed:
                raise PermissionDenied(
                    f"{principal.subject} may not {rule.action} {rule.resource} in tenant {tenant!r}"
                )

        return _around(behavior, request_streaming, response_streaming, before)
