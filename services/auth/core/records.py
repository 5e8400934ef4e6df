"""What the auth core hands back (tokens, tenants, principals, keys, delegations, pages) and the small checks and
helpers both halves of the core use."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from services.auth.core.tokens import new_id
from services.auth.store import AuditRecord
from services.mesh.errors import InvalidArgument

__all__ = [
    "TokenPair",
    "TenantInfo",
    "PrincipalInfo",
    "ApiKeyInfo",
    "DelegationInfo",
    "Page",
    "AuditPage",
    "Auditor",
    "utc",
    "subject_of",
    "check_text",
    "check_new_password",
    "CONTROL",
    "MAX_PASSWORD",
]

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_TEXT = 200
MIN_PASSWORD, MAX_PASSWORD = 12, 256


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    access_expires: datetime
    refresh_token: str = ""
    refresh_expires: datetime | None = None


@dataclass(frozen=True)
class TenantInfo:
    name: str
    display_name: str
    created_at: datetime


@dataclass(frozen=True)
class PrincipalInfo:
    subject: str
    tenant: str
    name: str
    kind: str
    created_at: datetime
    disabled: bool = False


@dataclass(frozen=True)
class ApiKeyInfo:
    key_id: str
    subject: str
    tenant: str
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked: bool


@dataclass(frozen=True)
class DelegationInfo:
    delegation_id: str
    subject: str
    tenant: str
    job_id: str
    delegate: str
    created_at: datetime
    expires_at: datetime
    revoked: bool


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_token: str


AuditPage = Page


def utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything in aidc is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def subject_of(kind: str, tenant: str, name: str) -> str:
    return f"{'user' if kind == 'user' else 'sa'}:{tenant}/{name}"


def check_text(label: str, value: str) -> None:
    if len(value) > _MAX_TEXT:
        raise InvalidArgument(f"{label} is longer than {_MAX_TEXT} characters")
    if CONTROL.search(value):
        raise InvalidArgument(f"{label} contains control characters")


def check_new_password(password: str, label: str = "password") -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidArgument(f"{label} must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")


def _current_trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


class Auditor:
    """Makes audit records stamped with the clock and the current trace."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock

    def __call__(self, actor: str, tenant: str, action: str, target: str, details: dict[str, Any]) -> AuditRecord:
        return AuditRecord(
            id=new_id("ae_"),
            time=self._clock(),
            actor=actor,
            tenant=tenant,
            action=action,
            target=target,
            trace_id=_current_trace_id(),
            details=details,
        )
