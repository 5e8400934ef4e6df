"""Serving a mesh service: the grpc.aio server with health, reflection, the interceptor chain, readiness,
and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import any_of, health_check, negate, service_prefix

from services.mesh.authz import PermissionChecker, PermissionTable, Rule, public
from services.mesh.channels import channel_options, server_credentials
from services.mesh.config import MeshSettings, parse_address
from services.mesh.files import use_private_umask
from services.mesh.identity import TokenVerifier
from services.mesh.interceptors import (
    AuthenticationInterceptor,
    AuthorizationInterceptor,
    DeadlineInterceptor,
    ErrorMappingInterceptor,
    RequestLimitInterceptor,
)
from services.mesh.logs import configure_logging
from services.mesh.memory import tune_allocator
from services.mesh.metrics import MetricsEndpoint, MetricsInterceptor, metrics_enabled
from services.mesh.telemetry import init_telemetry, shutdown_telemetry

__all__ = ["AddressUnavailable", "Registration", "MeshServer", "serve", "run_service", "INFRASTRUCTURE_SERVICES"]

log = logging.getLogger(__name__)

_S = TypeVar("_S", bound=MeshSettings)

#: Services every mesh server carries; their RPCs are public.
INFRASTRUCTURE_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)

_NOT_TRACED = any_of(health_check(), service_prefix("grpc.reflection"))
_MAX_CACHED_METHODS = 1024
#: How long one stop hook (closing a client, a leader's loops, an outbox's last flush) may take.
_STOP_HOOK_SECONDS = 60.0


class AddressUnavailable(RuntimeError):
    """A listener's address cannot be bound: another process holds the port, or the host is not this machine's."""


def _per_method(condition: Callable[[grpc.HandlerCallDetails], bool]) -> Callable[[grpc.HandlerCallDetails], bool]:
    """``condition`` decided once per method name: OpenTelemetry's filters split and normalise the method path
    on every call (tens of microseconds), on every RPC of every service. Bounded: callers may send any method
    name, served or not."""
    decided: dict[str, bool] = {}

    def decide(details: grpc.HandlerCallDetails) -> bool:
        hit = decided.get(details.method)
        if hit is None:
            hit = bool(condition(details))
            if len(decided) < _MAX_CACHED_METHODS:
                decided[details.method] = hit
        return hit

    return decide


@dataclass(frozen=True)
class Registration:
    """One gRPC service a server carries: its full name and how to add its servicer."""

    full_name: str
    add_to_server: Callable[[grpc.aio.Server], None]


def _infrastructure_rules() -> PermissionTable:
    rules: dict[str, Rule] = {}
    for service, methods in (
        ("grpc.health.v1.Health", ("Check", "Watch", "List")),
        ("grpc.reflection.v1alpha.ServerReflection", ("ServerReflectionInfo",)),
        ("grpc.reflection.v1.ServerReflection", ("ServerReflectionInfo",)),
    ):
        for method in methods:
            rules[f"/{service}/{method}"] = public()
    return PermissionTable(rules)


@dataclass
class MeshServer:
    """A service's gRPC server, built by its ``server.build_server`` and run by ``serve``.

    Two listeners serve the same RPCs: the mesh path (``address``; mutual TLS when the mesh has certificates, where a
    verified service certificate is a service identity) and, unless it is off, the tenant path (``tenant_address``;
    TLS without client certificates, tokens only, no mesh-only RPC). Health reports NOT_SERVING until
    ``readiness()`` returns True, then SERVING; on stop it goes back to NOT_SERVING before in-flight RPCs get
    ``grace`` seconds to finish.
    """

    name: str
    settings: MeshSettings
    registrations: Sequence[Registration]
    permissions: PermissionTable
    verifier: TokenVerifier
    checker: PermissionChecker
    readiness: Callable[[], Awaitable[bool]] | None = None
    on_stop: Sequence[Callable[[], Awaitable[None]]] = ()
    #: The innermost interceptor of a service with RPCs only its leader serves (services/mesh/forwarding.py).
    forwarding: grpc.aio.ServerInterceptor | None = None
    #: The mesh listener; None: the settings' address of this service.
    address: str | None = None
    #: The tenant listener; None: the settings' tenant address of this service unless ``address`` is given (a test's
    #: server on a port of its own then has no tenant listener unless it asks for one).
    tenant_address: str | None = None
    readiness_interval_seconds: float = 0.2
    port: int = 0
    #: The tenant listener's bound port (0: none).
    tenant_port: int = 0
    _servers: list[grpc.aio.Server] = field(default_factory=list, init=False, repr=False)
    _health: AsyncHealthServicer | None = field(default=None, init=False, repr=False)
    _ready_task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    #: The /metrics endpoint, when AIDC_METRICS_ADDR names one.
    metrics: MetricsEndpoint | None = field(default=None, init=False, repr=False)
    _stop_requested: asyncio.Event | None = field(default=None, init=False, repr=False)

    def _server(self, table: PermissionTable, *, tenant_path: bool) -> grpc.aio.Server:
        """One listener's server: the interceptor chain (the tenant path's authentication grants no service
        identity and refuses mesh-only RPCs), the registrations, health and reflection."""
        assert self._health is not None
        # Outermost: each RPC's time and status code include every other interceptor's work and refusals.
        measured = [MetricsInterceptor()] if metrics_enabled(self.settings) else []
        server = grpc.aio.server(
            interceptors=[
                *measured,
                aio_server_interceptor(filter_=_per_method(negate(_NOT_TRACED))),
                ErrorMappingInterceptor(),
                DeadlineInterceptor(),
                RequestLimitInterceptor(),
                AuthenticationInterceptor(table, self.verifier, tenant_path=tenant_path, service=self.name),
                AuthorizationInterceptor(table, self.checker),
                *([self.forwarding] if self.forwarding is not None else []),
            ],
            # No SO_REUSEPORT (gRPC's default on Linux): a second process on a service's port, a stale instance or
            # another `aidc up`, would silently answer a share of its connections. Without it, that start fails.
            options=[*channel_options(self.settings), ("grpc.so_reuseport", 0)],
        )
        for registration in self.registrations:
            registration.add_to_server(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [r.full_name for r in self.registrations]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        return server

    def _bind(self, server: grpc.aio.Server, address: str, *, tenant_path: bool, configured: bool) -> int:
        """Adds the listener's port; a ``configured`` address (from the settings) binds on the settings' host."""
        host, port = parse_address(address)
        bind = f"{self.settings.host if configured else host}:{port}"
        tls_dir = self.settings.tls_dir()
        path = "tenant" if tenant_path else "mesh"
        try:
            if tls_dir is None:
                bound = server.add_insecure_port(bind)
            else:
                # The tenant path asks for no client certificate at all: tenants never hold mesh certificates.
                require = not tenant_path and self.settings.client_auth == "require"
                bound = server.add_secure_port(bind, server_credentials(tls_dir, self.name, require))
        except RuntimeError:
            raise AddressUnavailable(
                f"{self.name} cannot listen on {bind} ({path} path): another process holds that port,"
                " or the address is not this host's"
            ) from None
        log.info("%s listening on %s:%d (%s path)", self.name, bind.rpartition(":")[0], bound, path)
        return bound

    async def start(self) -> int:
        """Binds and starts the listeners; returns the mesh listener's port. Readiness is polled in the
        background."""
        table = self.permissions.merged(_infrastructure_rules())
        self._health = AsyncHealthServicer()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        mesh = self._server(table, tenant_path=False)
        address = self.address or self.settings.address_of(self.name)
        self.port = self._bind(mesh, address, tenant_path=False, configured=self.address is None)
        self._servers = [mesh]
        tenant_address = self.tenant_address
        if tenant_address is None and self.address is None:
            tenant_address = self.settings.tenant_address_of(self.name)
        if tenant_address is not None:
            tenant = self._server(table, tenant_path=True)
            configured = self.tenant_address is None
            self.tenant_port = self._bind(tenant, tenant_address, tenant_path=True, configured=configured)
            self._servers.append(tenant)
        for server in self._servers:
            await server.start()
        self._start_metrics()
        self._ready_task = asyncio.create_task(self._become_ready(), name=f"{self.name}-readiness")
        return self.port

    def _start_metrics(self) -> None:
        address = self.settings.metrics_addr
        if address in ("", "off"):
            return
        self.metrics = MetricsEndpoint(
            address, self.settings.tls_dir(), self.name, require_client_cert=self.settings.client_auth == "require"
        )
        self.metrics.start()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        assert self._health is not None
        await self._health.set("", status)
        for registration in self.registrations:
            await self._health.set(registration.full_name, status)

    async def _become_ready(self) -> None:
        while True:
            try:
                ready = True if self.readiness is None else await self.readiness()
            except Exception as exc:  # noqa: BLE001 - a failing readiness check just means "not yet"
                log.info("%s not ready yet: %s", self.name, exc)
                ready = False
            if ready:
                await self._set_health(health_pb2.HealthCheckResponse.SERVING)
                log.info("%s is SERVING", self.name)
                return
            await asyncio.sleep(self.readiness_interval_seconds)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Waits until the readiness check passed."""
        assert self._ready_task is not None, "start() first"
        await asyncio.wait_for(asyncio.shield(self._ready_task), timeout)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first (so balancers drain), then stop with a grace period, then the stop hooks."""
        if not self._servers:
            return
        if self._ready_task is not None:
            self._ready_task.cancel()
        await self._health.enter_graceful_shutdown() if self._health else None
        seconds = self.settings.shutdown_grace_seconds if grace is None else grace
        await asyncio.gather(*(server.stop(seconds) for server in self._servers))
        self._servers = []
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        for hook in self.on_stop:
            await _bounded(hook, self.name)
        log.info("%s stopped", self.name)

    async def run_until_signal(self) -> None:
        """Starts, then serves until SIGTERM or SIGINT (or ``request_stop``)."""
        await self.start()
        stop = self._stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("%s received a stop signal", self.name)
        await self.stop()

    def request_stop(self, reason: str) -> None:
        """Stops the server as SIGTERM would (the process then exits and its supervisor starts it again): for state
        that cannot go on, e.g. a scheduler that lost its lease while it ran jobs."""
        log.warning("%s stops: %s", self.name, reason)
        if self._stop_requested is not None:
            self._stop_requested.set()
        else:  # started without run_until_signal (in a test's process)
            asyncio.get_running_loop().create_task(self.stop())


async def _bounded(hook: Callable[[], Awaitable[None]], name: str) -> None:
    """Runs one stop hook for at most _STOP_HOOK_SECONDS: a hook that hangs (a peer that never answers, a task that
    swallows its cancellation) is abandoned, cancelled and named in the log, so the service still stops."""
    task = asyncio.ensure_future(hook())
    done, _ = await asyncio.wait({task}, timeout=_STOP_HOOK_SECONDS)
    if not done:
        task.cancel()
        log.error("%s: stop step %s did not finish in %.0f s; abandoned", name, _hook_name(hook), _STOP_HOOK_SECONDS)
        return
    task.result()  # its own error, as before


def _hook_name(hook: Callable[..., object]) -> str:
    owner = getattr(hook, "__self__", None)
    qualname = getattr(hook, "__qualname__", repr(hook))
    return f"{type(owner).__name__}.{hook.__name__}" if owner is not None else qualname


def serve(build: Callable[[], Awaitable[MeshServer]]) -> None:
    """Runs a service process: builds its server inside the event loop and serves until signalled."""

    async def main() -> None:
        server = await build()
        await server.run_until_signal()

    asyncio.run(main())


def run_service(
    name: str,
    load_settings: Callable[[], _S],
    build: Callable[[_S], Awaitable[MeshServer]],
    malloc_arenas: int | None = None,
) -> None:
    """The whole life of a service process: the allocator tuned for large messages (services.mesh.memory; at most
    ``malloc_arenas`` arenas), private files, settings, logging, telemetry, serve until SIGTERM, flush spans."""
    tune_allocator(arenas=malloc_arenas)
    use_private_umask()
    settings = load_settings()
    configure_logging(name, settings.log_level)
    init_telemetry(name, settings.data_dir)
    try:
        serve(lambda: build(settings))
    except AddressUnavailable as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    finally:
        shutdown_telemetry()
