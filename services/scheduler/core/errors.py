"""The scheduler core's typed errors, rooted in the mesh hierarchy so the service maps them to gRPC statuses as is."""

from __future__ import annotations

from services.mesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, QuotaExceeded

__all__ = ["InvalidJob", "InvalidQuota", "InvalidConfig", "QueueFull", "UnknownNode", "DuplicateJob"]


class InvalidJob(InvalidArgument, ValueError):
    """A job that can never run as asked: unknown pool, negative or absurd resources, a gang no pool can hold
    (INVALID_ARGUMENT)."""


class InvalidQuota(FailedPrecondition, ValueError):
    """A quota below what the tenant holds now, or one that would leave its cohort lending more than it has
    (FAILED_PRECONDITION)."""


class InvalidConfig(InvalidArgument, ValueError):
    """A malformed pool, node or quota: negative values, an unknown pool, a lending limit above nominal
    (INVALID_ARGUMENT)."""


class QueueFull(QuotaExceeded):
    """The tenant already has max_queued_jobs queued in the pool (RESOURCE_EXHAUSTED)."""


class UnknownNode(NotFound):
    """No such node (NOT_FOUND)."""


class DuplicateJob(AlreadyExists):
    """A job with this id is already queued or admitted (ALREADY_EXISTS)."""
