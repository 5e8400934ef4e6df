"""The base of every typed client: deadlines, retries of idempotent calls, and status -> typed error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from services.mesh.errors import AidcError, error_for_status

__all__ = ["ServiceClient", "translate_rpc_error"]

_Resp = TypeVar("_Resp")

#: What an idempotent call retries: the service was unreachable, or went away mid-call (a received CANCELLED: see
#: errors.error_for_status).
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def translate_rpc_error(error: grpc.RpcError) -> AidcError:
    """The typed error for a failed call (the same class the server raised)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    # grpc-stubs types metadata entries loosely; they are (key, str | bytes) pairs.
    trailers: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return error_for_status(code, details or code.name, [(str(k), v) for k, v in (trailers or ())])


class ServiceClient:
    """Wraps a generated stub's calls; subclasses expose one typed method per RPC."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        timeout_seconds: float = 10.0,
        retries: int = 2,
        backoff_seconds: float = 0.1,
    ) -> None:
        self.channel = channel
        self._timeout = timeout_seconds
        self._retries = retries
        self._backoff = backoff_seconds

    async def close(self) -> None:
        await self.channel.close(None)

    async def _unary(
        self,
        method: Callable[..., Awaitable[_Resp]],
        request: Any,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> _Resp:
        """Calls a unary RPC; retries UNAVAILABLE and CANCELLED for idempotent calls; raises typed errors."""
        attempts = 1 + (self._retries if idempotent else 0)
        for attempt in range(attempts):
            try:
                return await method(request, timeout=timeout or self._timeout, metadata=metadata)
            except grpc.RpcError as error:
                if attempt + 1 < attempts and error.code() in _RETRYABLE:
                    await asyncio.sleep(self._backoff * (2**attempt))
                    continue
                raise translate_rpc_error(error) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _server_stream(
        self,
        method: Callable[..., Any],
        request: Any,
        *,
        timeout: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> AsyncIterator[Any]:
        """Iterates a server-streaming RPC, raising typed errors; a caller that stops early cancels the call (the
        server stops sending at once, rather than when this generator is collected)."""
        call = method(request, timeout=timeout, metadata=metadata)
        try:
            async for item in call:
                yield item
        except grpc.RpcError as error:
            raise translate_rpc_error(error) from None
        finally:
            call.cancel()

    async def _client_stream(
        self,
        method: Callable[..., Any],
        requests: Any,
        *,
        timeout: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> Any:
        """Calls a client-streaming RPC, raising typed errors."""
        try:
            return await method(requests, timeout=timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise translate_rpc_error(error) from None
