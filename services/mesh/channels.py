"""Channels for calls between services (the mesh path: mutual TLS when certificates are configured) and from
clients (the tenant path: TLS trusting a CA, no client certificate); plaintext only to loopback addresses; traced,
with the caller's identity and deadline forwarded.
"""

from __future__ import annotations

import ipaddress
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from services.mesh.certs import check_service_certificate
from services.mesh.config import MeshSettings, parse_address
from services.mesh.errors import InvalidArgument
from services.mesh.identity import current_principal
from services.mesh.interceptors import current_deadline

__all__ = [
    "create_channel",
    "service_channel",
    "tenant_channel",
    "channel_options",
    "client_credentials",
    "server_credentials",
    "ForwardingInterceptor",
    "split_by_call_kind",
]


def channel_options(settings: MeshSettings) -> list[tuple[str, Any]]:
    """gRPC options shared by servers and channels."""
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
    ]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read certificate file {path}: {exc.strerror}") from None


def client_credentials(certs_dir: Path, identity: str | None) -> grpc.ChannelCredentials:
    """TLS credentials trusting the mesh CA; with an identity, presenting its certificate (mutual TLS)."""
    root = _read(certs_dir / "ca.pem")
    if identity is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=_read(certs_dir / f"{identity}-key.pem"),
        certificate_chain=_read(certs_dir / f"{identity}.pem"),
    )


def server_credentials(certs_dir: Path, service: str, require_client_auth: bool) -> grpc.ServerCredentials:
    """The service's certificate, and (for mutual TLS) the CA that client certificates must chain to. Refuses to
    serve with anything but this service's own service certificate (an old or a client certificate)."""
    certificate = _read(certs_dir / f"{service}.pem")
    check_service_certificate(certificate, service, certs_dir / f"{service}.pem")
    return grpc.ssl_server_credentials(
        [(_read(certs_dir / f"{service}-key.pem"), certificate)],
        root_certificates=_read(certs_dir / "ca.pem"),
        require_client_auth=require_client_auth,
    )


def _is_loopback(target: str) -> bool:
    host, _ = parse_address(target)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CallDetailsInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Base of client interceptors that only rewrite the call details (metadata, timeout) of every call."""

    @abstractmethod
    def rewrite(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        """The details the call goes out with."""

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(self.rewrite(details), request)

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(self.rewrite(details), request)

    async def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return await continuation(self.rewrite(details), requests)

    async def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return await continuation(self.rewrite(details), requests)


class _UnaryUnaryDelegate(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await self._inner.intercept_unary_unary(continuation, details, request)


class _UnaryStreamDelegate(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await self._inner.intercept_unary_stream(continuation, details, request)


class _StreamUnaryDelegate(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return await self._inner.intercept_stream_unary(continuation, details, requests)


class _StreamStreamDelegate(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return await self._inner.intercept_stream_stream(continuation, details, requests)


_DELEGATES: tuple[tuple[type, type], ...] = (
    (grpc.aio.UnaryUnaryClientInterceptor, _UnaryUnaryDelegate),
    (grpc.aio.UnaryStreamClientInterceptor, _UnaryStreamDelegate),
    (grpc.aio.StreamUnaryClientInterceptor, _StreamUnaryDelegate),
    (grpc.aio.StreamStreamClientInterceptor, _StreamStreamDelegate),
)


def split_by_call_kind(interceptors: Sequence[Any]) -> list[Any]:
    """Gives an interceptor that implements several call kinds one delegate per kind.

    grpc.aio files each channel interceptor under the first call kind it implements only (an if/elif chain), so
    an object implementing all four would silently intercept unary-unary calls only: streaming calls would
    go out without the bearer token or the forwarded deadline.
    """
    out: list[Any] = []
    for interceptor in interceptors:
        kinds = [delegate for base, delegate in _DELEGATES if isinstance(interceptor, base)]
        if len(kinds) <= 1:
            out.append(interceptor)
        else:
            out.extend(delegate(interceptor) for delegate in kinds)
    return out


def with_bearer(details: grpc.aio.ClientCallDetails, token: str, timeout: float | None) -> grpc.aio.ClientCallDetails:
    """Call details with ``authorization: Bearer <token>`` added (unless the call has one) and a timeout."""
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    if token and "authorization" not in metadata:
        metadata.add("authorization", f"Bearer {token}")
    return grpc.aio.ClientCallDetails(details.method, timeout, metadata, details.credentials, details.wait_for_ready)


class ForwardingInterceptor(CallDetailsInterceptor):
    """Forwards the end user's bearer token and the remaining deadline of the RPC being served."""

    def rewrite(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        principal = current_principal.get()
        timeout = details.timeout
        deadline = current_deadline.get()
        if deadline is not None:
            remaining = max(deadline - time.monotonic(), 0.001)
            timeout = remaining if timeout is None else min(timeout, remaining)
        return with_bearer(details, principal.token if principal is not None else "", timeout)


def _client_interceptors(extra: Sequence[grpc.aio.ClientInterceptor]) -> list[Any]:
    """Tracing, then the forwarded token and deadline, then the caller's own."""
    return split_by_call_kind([*aio_client_interceptors(), ForwardingInterceptor(), *extra])


def create_channel(
    target: str,
    settings: MeshSettings,
    *,
    identity: str | None = "cli",
    extra_interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    server_name: str | None = None,
) -> grpc.aio.Channel:
    """A channel to another service.

    With certificates (``settings.tls_dir()``): TLS trusting the mesh CA, presenting ``identity``'s certificate (a
    service name, or "cli" for the operator's tools; None for server-only TLS), and expecting the server's
    certificate to name ``server_name`` (default: the target's host; a replica's pod address is in no certificate,
    so calls to one name its service, "aidc-<service>"). Without certificates the channel is plaintext, which is
    allowed only to loopback addresses (dev mode).
    """
    interceptors = _client_interceptors(extra_interceptors)
    options = channel_options(settings)
    tls_dir = settings.tls_dir()
    if tls_dir is not None:
        if server_name:
            options = [*options, ("grpc.ssl_target_name_override", server_name)]
        credentials = client_credentials(tls_dir, identity)
        return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
    if not _is_loopback(target):
        raise InvalidArgument(f"refusing a plaintext channel to non-loopback {target}: configure AIDC_CERTS_DIR")
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def service_channel(
    service: str,
    settings: MeshSettings,
    *,
    identity: str,
    extra_interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A channel from one mesh service (``identity``) to another, ``service``, at its configured address, which
    accepts only that service's certificate ("aidc-<service>"): every service certificate also names localhost and
    127.0.0.1, so checking the address alone would let any service (or its stolen key) stand in for another."""
    return create_channel(
        settings.address_of(service),
        settings,
        identity=identity,
        extra_interceptors=extra_interceptors,
        server_name=f"aidc-{service}",
    )


def tenant_channel(
    target: str,
    settings: MeshSettings,
    *,
    ca_file: Path | None = None,
    extra_interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A channel on the tenant path, as a tenant's program holds one: no client certificate, TLS trusting
    ``ca_file`` (default: the mesh's CA when the platform has certificates; else the system's CAs). Plaintext only
    to a loopback address of a platform without certificates (dev mode)."""
    interceptors = _client_interceptors(extra_interceptors)
    options = channel_options(settings)
    tls_dir = settings.tls_dir()
    if ca_file is None and tls_dir is not None:
        ca_file = tls_dir / "ca.pem"
    if ca_file is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=_read(ca_file))
    elif _is_loopback(target):
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    else:
        credentials = grpc.ssl_channel_credentials()
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
