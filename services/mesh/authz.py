"""Authorization: each service's permission table (one rule per RPC) and cached permission decisions.

A service declares, for every RPC it serves, one ``Rule``: public (no credentials), authenticated (any
caller; the servicer narrows it down), or a (resource, action) pair checked in the request's tenant or in the
platform scope. An RPC without a rule is refused. A rule marked ``mesh_only`` (what only services call: usage
recording, revocation lists, job delegations, permission checks, programs for the scheduler to run) is refused on the
tenant path whoever asks; this flag is the one place that decides which RPCs tenants can reach. Decisions come from
the auth service's CheckPermission (through a short-TTL cache), or from the local enforcer inside auth itself.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import Counter

from services.mesh.identity import PLATFORM_TENANT, Principal, outside_binding

__all__ = [
    "Scope",
    "Rule",
    "public",
    "authenticated",
    "tenant_rule",
    "platform_rule",
    "mesh_only",
    "PermissionTable",
    "PermissionChecker",
    "SubjectDecisions",
    "CachedPermissionChecker",
    "request_tenant",
]


class Scope(enum.Enum):
    """Where a rule's decision is made."""

    PUBLIC = "public"
    AUTHENTICATED = "authenticated"
    TENANT = "tenant"
    PLATFORM = "platform"


@dataclass(frozen=True)
class Rule:
    """The permission one RPC needs."""

    scope: Scope
    resource: str = ""
    action: str = ""
    #: Only the mesh path serves it (mesh services call it); the tenant path refuses it, whatever the caller holds.
    mesh_only: bool = False


def public() -> Rule:
    """No credentials needed (health, token issuance, key publication)."""
    return Rule(Scope.PUBLIC)


def authenticated() -> Rule:
    """Any authenticated caller; the servicer itself limits what it returns."""
    return Rule(Scope.AUTHENTICATED)


def tenant_rule(resource: str, action: str) -> Rule:
    """``action`` on ``resource`` in the request's tenant (its ``tenant`` field, else the caller's own)."""
    return Rule(Scope.TENANT, resource, action)


def platform_rule(resource: str, action: str) -> Rule:
    """``action`` on ``resource`` in the platform scope (operators)."""
    return Rule(Scope.PLATFORM, resource, action)


def mesh_only(rule: Rule) -> Rule:
    """``rule``, served on the mesh path only: refused with PERMISSION_DENIED on the tenant path."""
    return replace(rule, mesh_only=True)


class PermissionTable:
    """The rules of every RPC of one or more gRPC services, keyed by full method name."""

    def __init__(self, rules: Mapping[str, Rule]) -> None:
        self._rules = dict(rules)

    @classmethod
    def for_service(cls, service: ServiceDescriptor, rules: Mapping[str, Rule]) -> PermissionTable:
        """Builds a table from short RPC names; fails at start-up if an RPC has no rule or a rule no RPC."""
        methods = {m.name for m in service.methods}
        missing = sorted(methods - rules.keys())
        unknown = sorted(rules.keys() - methods)
        if missing or unknown:
            raise ValueError(f"permission table of {service.full_name}: missing {missing}, unknown {unknown}")
        return cls({f"/{service.full_name}/{name}": rule for name, rule in rules.items()})

    def merged(self, other: PermissionTable) -> PermissionTable:
        return PermissionTable({**self._rules, **other._rules})

    def rule(self, method: str) -> Rule | None:
        """The rule of a full method name ("/pkg.Service/Method"); None means: refuse."""
        return self._rules.get(method)

    def items(self) -> Iterable[tuple[str, Rule]]:
        return self._rules.items()


def request_tenant(request: Any) -> str:
    """The tenant a request names: its ``tenant`` field, or the ``tenant`` of its ``header`` submessage."""
    tenant = getattr(request, "tenant", None)
    if isinstance(tenant, str):
        return tenant
    header = getattr(request, "header", None)
    tenant = getattr(header, "tenant", None) if header is not None else None
    return tenant if isinstance(tenant, str) else ""


class PermissionChecker(Protocol):
    """Decides whether ``principal`` may do ``action`` on ``resource`` in ``tenant``."""

    async def check(self, principal: Principal, tenant: str, resource: str, action: str) -> bool: ...


class SubjectDecisions(Protocol):
    """Decisions by subject alone (auth's CheckPermission, asked with the caller's token)."""

    async def check(self, subject: str, tenant: str, resource: str, action: str) -> bool: ...


#: Every service's decisions by where they came from: its cache, or a CheckPermission call to auth (hit rate).
DECISIONS = Counter(
    "aidc_authz_decisions",
    "Authorization decisions of this service's permission checker, by source (cache or auth) and result.",
    ["source", "result"],
)


class CachedPermissionChecker:
    """A principal's decisions: refused outright outside the tenant its token is bound to (job delegations), else
    the subject's decision from ``inner``, cached (allow and deny) for a few seconds.

    The cache is keyed by subject, not by token: whether a token is still good (expired, revoked, signed by a
    retired key) is the verifier's business, decided on every request before any permission is checked.
    """

    def __init__(
        self,
        inner: SubjectDecisions,
        ttl_seconds: float = 5.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        metrics: bool = True,
    ) -> None:
        self._inner = inner
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._decisions: dict[tuple[str, str, str, str], tuple[bool, float]] = {}
        self._metrics = metrics
        # (source, allowed) -> counter child, bound once.
        self._counted = {
            (source, allowed): DECISIONS.labels(source, "allowed" if allowed else "denied")
            for source in ("cache", "auth")
            for allowed in (True, False)
        }

    async def check(self, principal: Principal, tenant: str, resource: str, action: str) -> bool:
        if outside_binding(principal, tenant):
            return False
        key = (principal.subject, tenant, resource, action)
        hit = self._decisions.get(key)
        now = self._clock()
        if hit is not None and hit[1] > now:
            if self._metrics:
                self._counted["cache", hit[0]].inc()
            return hit[0]
        allowed = await self._inner.check(principal.subject, tenant, resource, action)
        if self._metrics:
            self._counted["auth", allowed].inc()
        if len(self._decisions) >= self._max:
            self._decisions.clear()
        self._decisions[key] = (allowed, now + self._ttl)
        return allowed

    def invalidate(self) -> None:
        """Forgets every cached decision (after a role change in this process)."""
        self._decisions.clear()


def decide_scope_tenant(rule: Rule, request: Any, caller_tenant: str) -> str:
    """The tenant a rule is checked in, for a given request and caller."""
    if rule.scope is Scope.PLATFORM:
        return PLATFORM_TENANT
    return request_tenant(request) or caller_tenant
