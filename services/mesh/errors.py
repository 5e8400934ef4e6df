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
turn statuses back into the same classes, so a NotFound raised two services away arrives as NotFound.
"""

from __future__ import annotations

import grpc

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
    "error_for_status",
    "INTERNAL_MESSAGE",
]

#: What a caller sees for any error that is not a domain error.
INTERNAL_MESSAGE = "internal error"


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
    """A quota, budget or rate limit would be exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


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
    """The status code and caller-safe message for an exception raised while serving an RPC."""
    if isinstance(error, AidcError) and type(error) is not AidcError:
        return error.code, error.message
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def error_for_status(code: grpc.StatusCode, message: str) -> AidcError:
    """The typed error for a status received from another service (INTERNAL and unknown codes -> AidcError)."""
    if code == grpc.StatusCode.CANCELLED:
        return Aborted(message or "cancelled")
    return _BY_CODE.get(code, AidcError)(message)
