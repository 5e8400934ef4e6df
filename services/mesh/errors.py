"""The one exception hierarchy of aidc and its mapping to gRPC status codes.

    AidcError                      -> INTERNAL (generic message; never leaked)
    ├── InvalidArgument            -> INVALID_ARGUMENT
    ├── NotFound                   -> NOT_FOUND
    ├── AlreadyExists              -> ALREADY_EXISTS
    ├── PermissionDenied           -> PERMISSION_DENIED
    ├── Unauthenticated            -> UNAUTHENTICATED
    ├── FailedPrecondition         -> FAILED_PRECONDITION
    ├── QuotaExceeded              -> RESOURCE_EXHAUSTED
    ├── Aborted                    -> ABORTED
    ├── Unavailable                -> UNAVAILABLE
    ├── DeadlineExceeded           -> DEADLINE_EXCEEDED
    ├── DataLoss                   -> DATA_LOSS
    └── Unimplemented              -> UNIMPLEMENTED

Domain code raises these; the error-mapping server interceptor turns them into statuses, and typed clients
turn statuses back into the same classes, so a NotFound raised two services away arrives as NotFound. A
QuotaExceeded may carry a retry hint, sent the standard way (a ``google.rpc.RetryInfo`` in the status details,
trailer ``grpc-status-details-bin``) as well as in its message, so any gRPC client in any language can read it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "AidcError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "Unauthenticated",
    "FailedPrecondition",
    "QuotaExceeded",
    "Aborted",
    "Unavailable",
    "DeadlineExceeded",
    "DataLoss",
    "Unimplemented",
    "status_for",
    "status_details",
    "error_for_status",
    "STATUS_DETAILS_KEY",
    "INTERNAL_MESSAGE",
    "MAX_MESSAGE_BYTES",
    "bounded_message",
]

#: What a caller sees for any error that is not a domain error.
INTERNAL_MESSAGE = "internal error"
#: Longest status message sent, in UTF-8 bytes (percent-encoded on the wire, it stays far below gRPC's 8 KiB soft
#: limit on metadata).
MAX_MESSAGE_BYTES = 1024
#: The trailer that carries a serialized ``google.rpc.Status`` with typed details (gRPC's rich error model).
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class AidcError(Exception):
    """Root of every error aidc raises on purpose; its message is safe to show to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AidcError):
    """The request is malformed or a value is out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(AidcError):
    """The named thing does not exist (or the caller may not know that it does)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AidcError):
    """Something with that name or id already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(AidcError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(AidcError):
    """The caller's credentials are missing, malformed, expired or revoked."""

    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(AidcError):
    """The system is not in a state that allows this request."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class QuotaExceeded(AidcError):
    """A quota, budget or rate limit would be exceeded; ``retry_after_seconds``, when known, says when trying
    again can succeed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class Aborted(AidcError):
    """A concurrent change won; retrying may succeed."""

    code = grpc.StatusCode.ABORTED


class Unavailable(AidcError):
    """A dependency is down; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(AidcError):
    """The deadline ran out before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class DataLoss(AidcError):
    """Stored data is corrupt or was tampered with."""

    code = grpc.StatusCode.DATA_LOSS


class Unimplemented(AidcError):
    """The operation is not supported by this service."""

    code = grpc.StatusCode.UNIMPLEMENTED


_BY_CODE: dict[grpc.StatusCode, type[AidcError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        Unauthenticated,
        FailedPrecondition,
        QuotaExceeded,
        Aborted,
        Unavailable,
        DeadlineExceeded,
        DataLoss,
        Unimplemented,
    )
}


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-safe message for an exception raised while serving an RPC. Messages that quote a
    caller's input are cut to MAX_MESSAGE_BYTES: a status message travels in a trailer, and one past gRPC's metadata
    limit (16 KiB) reaches the caller as RESOURCE_EXHAUSTED instead of its status (found by fuzzing)."""
    if isinstance(error, AidcError) and type(error) is not AidcError:
        return error.code, bounded_message(error.message)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def bounded_message(message: str) -> str:
    """``message``, cut to at most MAX_MESSAGE_BYTES of UTF-8."""
    encoded = message.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_MESSAGE_BYTES:
        return message
    return encoded[: MAX_MESSAGE_BYTES - 3].decode("utf-8", "ignore") + "..."


def status_details(error: BaseException) -> bytes | None:
    """The serialized ``google.rpc.Status`` to send in the STATUS_DETAILS_KEY trailer, or None (no typed details)."""
    retry_after = getattr(error, "retry_after_seconds", None)
    if not isinstance(error, QuotaExceeded) or retry_after is None:
        return None
    seconds = max(retry_after, 0.0)
    whole = math.floor(seconds)
    delay = duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    code, message = status_for(error)
    return status_pb2.Status(code=code.value[0], message=message, details=[detail]).SerializeToString()


def _retry_after(trailers: Iterable[tuple[str, str | bytes]]) -> float | None:
    for key, value in trailers:
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # noqa: BLE001 - a peer's malformed details are not worth failing the call over
            return None
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def error_for_status(
    code: grpc.StatusCode, message: str, trailers: Iterable[tuple[str, str | bytes]] = ()
) -> AidcError:
    """The typed error for a status received from another service (INTERNAL and unknown codes -> AidcError);
    a retry hint in the trailers comes back as QuotaExceeded.retry_after_seconds."""
    if code == grpc.StatusCode.CANCELLED:
        # Received, CANCELLED means the other side cut the call (a server stopping past its grace period, say): a
        # caller's own cancel never arrives as a status (grpc.aio raises CancelledError locally). Nothing concurrent
        # won (Aborted); the service went away mid-call, and a retry may well succeed.
        return Unavailable(f"the call was cut off by the other side ({message or 'CANCELLED'})")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return QuotaExceeded(message, _retry_after(trailers))
    return _BY_CODE.get(code, AidcError)(message)
