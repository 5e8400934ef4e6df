"""The tenant-facing inference gateway: Triton's own KServe v2 ``inference.GRPCInferenceService``, served on the
serving service's port in front of a real Triton, so every Triton client works unchanged with a bearer token.

    gateway = build_gateway(settings, routes, security)
    server = secured_server(
        "serving", settings, [deployments, gateway.registration()], SERVING_PERMISSIONS.merged(GATEWAY_PERMISSIONS),
        readiness=gateway.triton_ready, on_stop=[gateway.close], security=security,
    )
    await gateway.start()

Tenants name their models as they are registered ("bert"), or qualified ("acme/bert") to reach another tenant's;
platform callers always qualify. Per request: the mesh interceptors authenticate the caller; the gateway checks
``models:infer`` (``models:read`` for metadata, config and readiness) in the model's tenant before it says whether
the model exists, maps it to Triton's ``<tenant>__<model>`` at the deployed version, applies the tenant's rate limit
and budget, and forwards the request bytes as they are (see wire.py) with the W3C trace context and the caller's
remaining deadline, and nothing else: Triton never sees a tenant's token. Triton's answer comes back naming the
model as the caller did; its error statuses pass through; Triton unreachable is UNAVAILABLE at once. Every served
request is metered (metering.py).

Only the RPCs below are registered: Triton's model control (RepositoryModelLoad/Unload, RepositoryIndex),
statistics, shared memory and trace/log settings answer UNIMPLEMENTED, so no tenant can reach them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
import tritonclient.grpc.service_pb2 as spb
from grpc.aio import ServicerContext
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.billing.client import BillingClient, UsageEmitter
from services.mesh.authz import PermissionChecker, PermissionTable, Rule, authenticated, public
from services.mesh.channels import service_channel
from services.mesh.errors import (
    AidcError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    Unavailable,
    bounded_message,
)
from services.mesh.identity import PLATFORM_TENANT, require_principal
from services.mesh.metrics import metrics_enabled
from services.mesh.security import MeshSecurity
from services.mesh.server import Registration
from services.serving.config import ServingSettings
from services.serving.limits import BudgetGuard, TenantRateLimiter
from services.serving.metering import InferenceMeter, TritonStatistics
from services.serving.metrics import GatewayMetrics, TritonMetricsRelay
from services.serving.routes import Route, Routes
from services.serving.triton import TritonAccess
from services.serving.wire import (
    read_header,
    read_stream_response,
    rename_response,
    rewrite_stream_response,
    route_request,
)

__all__ = ["GATEWAY_PERMISSIONS", "INFERENCE_SERVICE", "InferenceGateway", "build_gateway", "triton_channel"]

log = logging.getLogger(__name__)

INFERENCE_SERVICE = "inference.GRPCInferenceService"
_PROBES = ("ServerLive", "ServerReady")
_SERVED = (*_PROBES, "ServerMetadata", "ModelReady", "ModelMetadata", "ModelConfig", "ModelInfer", "ModelStreamInfer")


def _rule(method: str) -> Rule:
    # Probes are public (Kubernetes asks without credentials); the gateway authorizes the rest per model itself.
    return public() if method in _PROBES else authenticated()


#: The mesh interceptors' rules for the gateway's RPCs.
GATEWAY_PERMISSIONS = PermissionTable({f"/{INFERENCE_SERVICE}/{m}": _rule(m) for m in _SERVED})

#: Without a caller deadline, a forwarded unary call gives up after this long.
DEFAULT_TIMEOUT_SECONDS = 60.0
_READY_TIMEOUT_SECONDS = 2.0
#: Model config parameters that describe the server, not the model (a path on the Triton host).
_SERVER_PARAMETERS = ("EXECUTION_ENV_PATH",)
_TRACE_CONTEXT = TraceContextTextMapPropagator()
_EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs


def triton_channel(access: TritonAccess, max_message_bytes: int) -> grpc.aio.Channel:
    """A channel to Triton (mutual TLS or plaintext, as ``access`` says; Triton is not a mesh service).

    Reconnection backs off from 100 ms to at most 1 s, so a restarted Triton is picked up within about a second;
    calls never wait for a connection (no wait_for_ready): while Triton is down they fail at once.
    """
    return access.channel(
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ],
    )


def build_gateway(
    settings: ServingSettings, routes: Routes, security: MeshSecurity, access: TritonAccess | None = None
) -> InferenceGateway:
    """The gateway as the serving service runs it: Triton as ``access`` (default: from the settings) says, budgets
    from billing (asked as the serving service), usage through the service's durable outbox."""
    access = access or settings.triton_access()
    channel = triton_channel(access, settings.max_message_bytes)
    # One attempt with a short timeout: a slow billing must not hold a tenant's first request for long.
    billing = BillingClient(service_channel("billing", settings, identity="serving"), timeout_seconds=2.0, retries=0)
    statistics = TritonStatistics(channel, access.metadata)
    enabled = metrics_enabled(settings)
    return InferenceGateway(
        routes=routes,
        checker=security.checker,
        limiter=TenantRateLimiter(settings.serving_rate_limit_per_second, settings.serving_rate_limit_burst),
        budget=BudgetGuard(billing, settings.serving_budget_cache_seconds),
        meter=InferenceMeter(
            UsageEmitter.for_service(settings, "serving"), statistics, settings.serving_metering_interval_seconds
        ),
        triton=channel,
        triton_metadata=access.metadata,
        metrics=GatewayMetrics(enabled),
        relay=TritonMetricsRelay(statistics, enabled=enabled, relay=settings.serving_relay_triton_metrics),
    )


def _trace_metadata(access: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Triton's access header (``access``) and traceparent/tracestate of the current span: the only metadata Triton
    receives."""
    carrier: dict[str, str] = {}
    _TRACE_CONTEXT.inject(carrier)
    return (*access, *carrier.items())


def _in_tenant_terms(text: str, route: Route, name: str) -> str:
    """Triton's text with its model name replaced by the name the tenant used."""
    return text.replace(route.triton_name, name)


def _timeout(context: ServicerContext[Any, Any], default: float | None = DEFAULT_TIMEOUT_SECONDS) -> float | None:
    remaining: float | None = context.time_remaining()
    return default if remaining is None else remaining


class InferenceGateway:
    """GRPCInferenceService in front of Triton. ``start()`` before serving, ``close()`` after.

    ``routes`` (written by the deployments core) maps tenant models to Triton models; ``checker`` is the mesh's
    cached permission checker; ``triton`` a channel to Triton (``triton_channel``), owned by the gateway from now on,
    and ``triton_metadata`` what every call to Triton carries (TritonAccess.metadata).
    """

    def __init__(
        self,
        *,
        routes: Routes,
        checker: PermissionChecker,
        limiter: TenantRateLimiter,
        budget: BudgetGuard,
        meter: InferenceMeter,
        triton: grpc.aio.Channel,
        triton_metadata: tuple[tuple[str, str], ...] = (),
        metrics: GatewayMetrics | None = None,
        relay: TritonMetricsRelay | None = None,
    ) -> None:
        self._metrics = metrics or GatewayMetrics()
        self._relay = relay
        self._routes = routes
        self._access = triton_metadata
        self._checker = checker
        self._limiter = limiter
        self._budget = budget
        self.meter = meter
        self._channel = triton

        def method(name: str, request: Any = None, response: Any = None) -> Any:
            serializer = None if request is None else request.SerializeToString
            deserializer = None if response is None else response.FromString
            return triton.unary_unary(f"/{INFERENCE_SERVICE}/{name}", serializer, deserializer)

        self._triton_infer = method("ModelInfer")
        self._triton_stream = triton.stream_stream(f"/{INFERENCE_SERVICE}/ModelStreamInfer", None, None)
        self._triton_metadata = method("ServerMetadata", spb.ServerMetadataRequest, spb.ServerMetadataResponse)
        self._triton_ready = method("ServerReady", spb.ServerReadyRequest, spb.ServerReadyResponse)
        self._triton_model_ready = method("ModelReady", spb.ModelReadyRequest, spb.ModelReadyResponse)
        self._triton_model_metadata = method("ModelMetadata", spb.ModelMetadataRequest, spb.ModelMetadataResponse)
        self._triton_model_config = method("ModelConfig", spb.ModelConfigRequest, spb.ModelConfigResponse)

    # -- life cycle -------------------------------------------------------------------------------------

    async def start(self, deliver_usage: bool = True) -> None:
        """Starts metering (its loop, and the usage outbox's sender when ``deliver_usage``) and Triton's metrics."""
        await self.meter.start(deliver=deliver_usage)
        if self._relay is not None:
            self._relay.start()

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Meters what was served (trying ``flush_timeout`` seconds to deliver it; the rest stays in the outbox),
        then closes the billing and Triton connections."""
        if self._relay is not None:
            await self._relay.close()
        await self.meter.close(flush_timeout)
        await self._budget.close()
        await self._channel.close(None)

    async def triton_ready(self) -> bool:
        """Whether Triton answers ServerReady with ready (the serving service's readiness)."""
        try:
            response = await self._triton_ready(
                spb.ServerReadyRequest(), timeout=_READY_TIMEOUT_SECONDS, metadata=self._access
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(response.ready)

    def registration(self) -> Registration:
        """The gateway's RPCs, for the serving service's MeshServer."""

        def unary(behavior: Callable[..., Any], request: Any = None, response: Any = None) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                behavior,
                request_deserializer=None if request is None else request.FromString,
                response_serializer=None if response is None else response.SerializeToString,
            )

        handler = grpc.method_handlers_generic_handler(
            INFERENCE_SERVICE,
            {
                "ServerLive": unary(self.server_live, spb.ServerLiveRequest, spb.ServerLiveResponse),
                "ServerReady": unary(self.server_ready, spb.ServerReadyRequest, spb.ServerReadyResponse),
                "ServerMetadata": unary(self.server_metadata, spb.ServerMetadataRequest, spb.ServerMetadataResponse),
                "ModelReady": unary(self.model_ready, spb.ModelReadyRequest, spb.ModelReadyResponse),
                "ModelMetadata": unary(self.model_metadata, spb.ModelMetadataRequest, spb.ModelMetadataResponse),
                "ModelConfig": unary(self.model_config, spb.ModelConfigRequest, spb.ModelConfigResponse),
                "ModelInfer": unary(self.model_infer),
                "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.model_stream_infer),
            },
        )
        return Registration(INFERENCE_SERVICE, lambda server: server.add_generic_rpc_handlers((handler,)))

    # -- admission --------------------------------------------------------------------------------------

    async def _route(self, name: str, version: str, action: str) -> Route:
        """The route serving model ``name`` at ``version`` ("" = the deployed one) for the caller.

        PermissionDenied comes before NotFound, so a caller learns nothing about models it may not use.
        """
        principal = require_principal()
        tenant, slash, model = name.partition("/")
        if not slash:
            if principal.tenant == PLATFORM_TENANT:
                raise InvalidArgument(f"name the tenant of model {name!r}: 'tenant/model'")
            tenant, model = principal.tenant, name
        if not tenant or not model:
            raise InvalidArgument(f"model name {name!r} is not 'model' or 'tenant/model'")
        if not await self._checker.check(principal, tenant, "models", action):
            raise PermissionDenied(f"{principal.subject} may not {action} models in tenant {tenant!r}")
        route = self._routes.get(tenant, model)
        if route is None:
            raise NotFound(f"model {model!r} is not deployed in tenant {tenant!r}")
        if version and version != route.version:
            raise NotFound(
                f"version {version!r} of model {model!r} is not deployed in tenant {tenant!r} "
                f"(version {route.version} is)"
            )
        return route

    async def _admit(self, name: str, version: str) -> Route:
        """The route of an inference request that may go ahead: authorized, within rate and budget."""
        route = await self._route(name, version, "infer")
        try:
            self._limiter.admit(route.tenant)
        except QuotaExceeded:
            self._metrics.refused(route.tenant, "rate_limit")
            raise
        try:
            await self._budget.admit(route.tenant)
        except QuotaExceeded:
            self._metrics.refused(route.tenant, "budget")
            raise
        if not self.meter.has_baseline(route):
            await self.meter.take_baseline(route)
        return route

    async def _fail(
        self, error: grpc.aio.AioRpcError, context: ServicerContext[Any, Any], route: Route | None, name: str
    ) -> NoReturn:
        """Ends the RPC with Triton's status and details (naming the model as the caller did), or UNAVAILABLE
        without details (they name Triton's address) when Triton could not be reached."""
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            self.meter.forget_baselines()  # Triton may come back with fresh counters
            log.info("Triton unavailable: %s", error.details())
            raise Unavailable("inference server unavailable; retry later")
        details = error.details() or ""
        details = details if route is None else _in_tenant_terms(details, route, name)
        await context.abort(error.code(), bounded_message(details))  # Triton's may quote the request at any length

    # -- inference ---------------------------------------------------------------------------------------

    async def model_infer(self, request: bytes, context: ServicerContext[Any, Any]) -> bytes:
        header = read_header(request)
        route = await self._admit(header.model_name, header.model_version)
        span = trace.get_current_span()
        span.set_attribute("aidc.serving.tenant", route.tenant)
        span.set_attribute("aidc.serving.model", route.model)
        span.set_attribute("aidc.serving.model_version", route.version)
        started_ns = time.time_ns()
        clock = time.perf_counter_ns()
        try:
            response: bytes = await self._triton_infer(
                route_request(request, route.triton_name, route.version),
                timeout=_timeout(context),
                metadata=_trace_metadata(self._access),
            )
        except grpc.aio.AioRpcError as error:
            await self._fail(error, context, route, header.model_name)
        took = time.perf_counter_ns() - clock
        self.meter.record(route, started_ns, took, span.get_span_context().trace_id)
        self._metrics.served(route, took)
        return rename_response(response, header.model_name)

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        stream = _InferStream(self, context)
        async for response in stream.run(requests):
            yield response

    # -- server and model information ---------------------------------------------------------------------

    async def server_live(self, request: spb.ServerLiveRequest, context: ServicerContext[Any, Any]) -> Any:
        """The gateway process is live; Triton's health is readiness (a restart of the gateway would not fix it)."""
        return spb.ServerLiveResponse(live=True)

    async def server_ready(self, request: spb.ServerReadyRequest, context: ServicerContext[Any, Any]) -> Any:
        return spb.ServerReadyResponse(ready=await self.triton_ready())

    async def server_metadata(self, request: spb.ServerMetadataRequest, context: ServicerContext[Any, Any]) -> Any:
        # A request of its own, not the caller's bytes: Triton answers INTERNAL to bytes it cannot parse (found by
        # fuzzing), while the mesh refuses them with INVALID_ARGUMENT before this runs.
        try:
            return await self._triton_metadata(
                spb.ServerMetadataRequest(), timeout=_timeout(context), metadata=self._access
            )
        except grpc.aio.AioRpcError as error:
            await self._fail(error, context, None, "")

    async def model_ready(self, request: spb.ModelReadyRequest, context: ServicerContext[Any, Any]) -> Any:
        """Not deployed is ``ready: false``, as Triton answers for a model it does not know (clients poll it)."""
        try:
            route = await self._route(request.name, request.version, "read")
        except NotFound:
            return spb.ModelReadyResponse(ready=False)
        forwarded = spb.ModelReadyRequest(name=route.triton_name, version=route.version)
        return await self._ask_triton(self._triton_model_ready, forwarded, context, route, request.name)

    async def model_metadata(self, request: spb.ModelMetadataRequest, context: ServicerContext[Any, Any]) -> Any:
        route = await self._route(request.name, request.version, "read")
        forwarded = spb.ModelMetadataRequest(name=route.triton_name, version=route.version)
        response = await self._ask_triton(self._triton_model_metadata, forwarded, context, route, request.name)
        response.name = request.name
        del response.versions[:]
        response.versions.append(route.version)  # other loaded versions are not reachable through the gateway
        return response

    async def model_config(self, request: spb.ModelConfigRequest, context: ServicerContext[Any, Any]) -> Any:
        route = await self._route(request.name, request.version, "read")
        forwarded = spb.ModelConfigRequest(name=route.triton_name, version=route.version)
        response = await self._ask_triton(self._triton_model_config, forwarded, context, route, request.name)
        response.config.name = request.name
        for key in _SERVER_PARAMETERS:
            response.config.parameters.pop(key, None)
        return response

    async def _ask_triton(
        self, method: Any, request: Any, context: ServicerContext[Any, Any], route: Route, name: str
    ) -> Any:
        try:
            return await method(request, timeout=_timeout(context), metadata=_trace_metadata(self._access))
        except grpc.aio.AioRpcError as error:
            await self._fail(error, context, route, name)


_DONE = object()


class _InferStream:
    """One ModelStreamInfer call: each request is admitted on its own and the admitted ones go to Triton on one
    stream. A refused request is answered in the stream, as Triton answers a failed one (``error_message``).

    Requests go to Triton under ids of the gateway's own (the tenant's ids need not be unique), which also tells
    which request each response answers; the response is given back the tenant's id and model name.
    """

    def __init__(self, gateway: InferenceGateway, context: ServicerContext[Any, Any]) -> None:
        self._gateway = gateway
        self._context = context
        self._ids = itertools.count(1)
        # gateway id -> (route, model name as the tenant gave it, tenant's id, wall-clock start, perf counter start)
        self._pending: dict[str, tuple[Route, str, str, int, int]] = {}
        self._out: asyncio.Queue[Any] = asyncio.Queue()
        self._trace_id = trace.get_current_span().get_span_context().trace_id

    async def run(self, requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        call = self._gateway._triton_stream(
            None, timeout=_timeout(self._context, None), metadata=_trace_metadata(self._gateway._access)
        )
        tasks = [asyncio.create_task(self._send(requests, call)), asyncio.create_task(self._receive(call))]
        try:
            finished = 0
            while finished < len(tasks):
                item = await self._out.get()
                if item is _DONE:
                    finished += 1
                elif isinstance(item, grpc.aio.AioRpcError):
                    await self._gateway._fail(item, self._context, None, "")
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            call.cancel()
            for task in tasks:
                task.cancel()

    async def _send(self, requests: AsyncIterator[bytes], call: Any) -> None:
        try:
            async for request in requests:
                forwarded = await self._admit(request)
                if forwarded is not None:
                    await call.write(forwarded)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call to Triton ended: _receive reports its status
        except Exception as error:  # noqa: BLE001 - ends the stream with it (INTERNAL, logged by the mesh)
            self._out.put_nowait(error)
        finally:
            self._out.put_nowait(_DONE)

    async def _admit(self, request: bytes) -> bytes | None:
        """The request as it goes to Triton, or None when it was refused (and answered)."""
        tenant_id = ""
        try:
            header = read_header(request)
            tenant_id = header.id
            route = await self._gateway._admit(header.model_name, header.model_version)
        except AidcError as error:
            refusal = spb.ModelStreamInferResponse(error_message=f"{error.code.name}: {error.message}")
            refusal.infer_response.id = tenant_id
            self._out.put_nowait(refusal.SerializeToString())
            return None
        gateway_id = str(next(self._ids))
        self._pending[gateway_id] = (route, header.model_name, tenant_id, time.time_ns(), time.perf_counter_ns())
        return route_request(request, route.triton_name, route.version, gateway_id)

    async def _receive(self, call: Any) -> None:
        try:
            while (response := await call.read()) is not _EOF:
                self._out.put_nowait(self._answer(response))
        except grpc.aio.AioRpcError as error:
            self._out.put_nowait(error)
        finally:
            self._out.put_nowait(_DONE)

    def _answer(self, response: bytes) -> bytes:
        """Triton's response with the tenant's id and model name; a served request is metered."""
        error, header = read_stream_response(response)
        pending = self._pending.pop(header.id, None)
        if pending is None:  # not one of ours (a decoupled model's later response): nothing to rename it to
            return response
        route, name, tenant_id, started_ns, clock = pending
        if error:
            return _stream_error(response, route, name, tenant_id)
        took = time.perf_counter_ns() - clock
        self._gateway.meter.record(route, started_ns, took, self._trace_id)
        self._gateway._metrics.served(route, took)
        return rewrite_stream_response(response, name, tenant_id)


def _stream_error(response: bytes, route: Route, name: str, tenant_id: str) -> bytes:
    """Triton's answer to a failed stream request in the tenant's terms (its message names the model too). Failures
    are rare, so this one parses the message."""
    message = spb.ModelStreamInferResponse.FromString(response)
    message.error_message = _in_tenant_terms(message.error_message, route, name)
    message.infer_response.model_name = name
    message.infer_response.id = tenant_id
    return message.SerializeToString()
