"""Roles and the RBAC-with-domains policy (Casbin; domain = tenant, plus the "platform" domain).

Which role may do what is defined here, in ``ROLE_PERMISSIONS``; every tenant receives its own copy of
these role policies (so Casbin's index on (domain, object) keeps decisions fast at 10,000+ lines), and the
copies are brought in line with this table at every start. Users get roles through role bindings
(Casbin ``g`` lines). A platform-admin binding in the platform domain applies to every tenant.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import casbin
from casbin.model.model_fast import FastModel

from services.auth.metrics import AuthMetrics
from services.mesh.identity import PLATFORM_TENANT

__all__ = [
    "ROLES",
    "TENANT_ROLES",
    "PLATFORM_ROLES",
    "RESOURCES",
    "ROLE_PERMISSIONS",
    "CASBIN_MODEL",
    "PolicyEngine",
    "role_policy_lines",
    "role_table_markdown",
]

CASBIN_MODEL = """
[request_definition]
r = sub, dom, obj, act

[policy_definition]
p = sub, dom, obj, act

[role_definition]
g = _, _, _

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = r.dom == p.dom && r.obj == p.obj && r.act == p.act && g(r.sub, p.sub, r.dom)
"""

#: Every resource kind and the actions on it.
RESOURCES: dict[str, tuple[str, ...]] = {
    "tenants": ("read", "write"),
    "users": ("read", "write"),
    "apikeys": ("read", "write"),
    "roles": ("read", "write"),
    "audit": ("read",),
    "permissions": ("check",),
    "signing-keys": ("write",),
    "datasets": ("read", "write", "delete"),
    "artifacts": ("read", "write", "delete"),
    "keys": ("rotate", "delete"),
    "jobs": ("read", "write", "cancel"),
    "models": ("read", "write", "infer"),
    "deployments": ("read", "write"),
    "usage": ("read", "write"),
    "invoices": ("read", "write"),
    "budgets": ("read", "write"),
    "pricebook": ("read", "write"),
    "quotas": ("read", "write"),
    "pools": ("read", "write"),
}


def _all(resource: str) -> list[tuple[str, str]]:
    return [(resource, action) for action in RESOURCES[resource]]


def _reads(*resources: str) -> list[tuple[str, str]]:
    return [(r, "read") for r in resources]


_TENANT_DATA = ("datasets", "artifacts", "jobs", "models", "deployments")

#: What each role may do in the domain it is bound in.
ROLE_PERMISSIONS: dict[str, list[tuple[str, str]]] = {
    "tenant-admin": [
        ("tenants", "read"),
        *_all("users"),
        *_all("apikeys"),
        *_all("roles"),
        ("audit", "read"),
        ("permissions", "check"),
        *[p for r in _TENANT_DATA for p in _all(r)],
        *_all("keys"),
        ("usage", "read"),
        ("invoices", "read"),
        *_all("budgets"),
        ("pricebook", "read"),
        ("quotas", "read"),
        ("pools", "read"),
    ],
    "developer": [
        ("tenants", "read"),
        ("users", "read"),
        *_all("apikeys"),
        ("permissions", "check"),
        *[p for r in _TENANT_DATA for p in _all(r)],
        ("usage", "read"),
        ("quotas", "read"),
        ("pools", "read"),
        ("pricebook", "read"),
    ],
    "viewer": [
        *_reads("tenants", "users", *_TENANT_DATA, "quotas", "pools"),
    ],
    "billing-viewer": [
        *_reads("tenants", "usage", "invoices", "budgets", "pricebook", "quotas"),
    ],
    "platform-admin": [(r, a) for r in RESOURCES for a in RESOURCES[r]],
    # Mesh services acting on their own behalf (identified by their mTLS certificate).
    "service": [
        ("permissions", "check"),
        ("tenants", "read"),
        ("usage", "write"),
        ("quotas", "read"),
        ("budgets", "read"),
        ("pools", "read"),
        ("models", "read"),
        ("artifacts", "read"),
        # No artifacts:write: a training job publishes its model acting for its submitter (a job delegation, bound
        # to the job's tenant), never as the training service itself, which could then write into any tenant.
        ("datasets", "read"),
    ],
}

#: Roles a tenant's subjects can hold in that tenant.
TENANT_ROLES: tuple[str, ...] = ("tenant-admin", "developer", "viewer", "billing-viewer")
#: Roles bound in the platform domain.
PLATFORM_ROLES: tuple[str, ...] = ("platform-admin", "service")
ROLES: tuple[str, ...] = TENANT_ROLES + PLATFORM_ROLES


def role_policy_lines(tenant: str) -> list[tuple[str, ...]]:
    """The ``p`` lines that define the roles of one domain."""
    roles = PLATFORM_ROLES if tenant == PLATFORM_TENANT else TENANT_ROLES
    return [("p", role, tenant, resource, action) for role in roles for resource, action in ROLE_PERMISSIONS[role]]


class PolicyEngine:
    """The in-memory Casbin enforcer (indexed on domain and object) over the persisted policy.

    Not thread-safe, like Casbin's FastEnforcer itself: use it from the event loop only.
    """

    def __init__(self, adapter: Any, metrics: AuthMetrics | None = None) -> None:
        self._metrics = metrics or AuthMetrics()
        model = FastModel([1, 2])
        model.load_model_from_text(CASBIN_MODEL)
        self._enforcer = casbin.FastEnforcer(model, adapter, cache_key_order=[1, 2])
        # pycasbin's domain role manager installs an equality "pattern" matcher that changes no decision but makes
        # each role link scan every role: the first check in a tenant with n bindings cost O(n^2) on the event loop
        # (6 s at 3,000 bindings). Without it that is O(n), and a new subject costs O(1).
        self._enforcer.get_role_manager().add_matching_func(None)
        self._enforcer.enable_auto_save(False)
        # Exact memo of decisions: this process holds the only writer, and every change clears it.
        self._decisions: dict[tuple[str, str, str, str], bool] = {}

    def reload(self) -> None:
        self._enforcer.load_policy()
        self._decisions.clear()

    def allowed(self, subject: str, tenant: str, resource: str, action: str) -> bool:
        """The decision: allowed in the tenant, or through a platform-domain role for every tenant."""
        key = (subject, tenant, resource, action)
        decision = self._decisions.get(key)
        if decision is not None:
            self._metrics.memo_hit.inc()
        else:
            self._metrics.memo_miss.inc()
            decision = self.enforce(subject, tenant, resource, action)
            if len(self._decisions) >= 100_000:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    def enforce(self, subject: str, tenant: str, resource: str, action: str) -> bool:
        """The decision straight from Casbin, bypassing the memo."""
        if self._enforcer.enforce(subject, tenant, resource, action):
            return True
        return tenant != PLATFORM_TENANT and bool(self._enforcer.enforce(subject, PLATFORM_TENANT, resource, action))

    def apply(self, add: Iterable[tuple[str, ...]], remove: Iterable[tuple[str, ...]] = ()) -> None:
        """Mirrors committed policy changes into the enforcer."""
        self._decisions.clear()
        for line in add:
            ptype, *rule = line
            if ptype == "p":
                self._enforcer.add_policy(*rule)
            else:
                self._enforcer.add_named_grouping_policy(ptype, *rule)
        for line in remove:
            ptype, *rule = line
            if ptype == "p":
                self._enforcer.remove_policy(*rule)
            else:
                self._enforcer.remove_named_grouping_policy(ptype, *rule)

    def has_line(self, line: Sequence[str]) -> bool:
        ptype, *rule = line
        if ptype == "p":
            return bool(self._enforcer.has_policy(*rule))
        return bool(self._enforcer.has_named_grouping_policy(ptype, *rule))

    def bindings(self, tenant: str | None = None, subject: str | None = None) -> list[tuple[str, str, str]]:
        """Role bindings as (subject, role, tenant)."""
        out = []
        for sub, role, dom in self._enforcer.get_named_grouping_policy("g"):
            if (tenant is None or dom == tenant) and (subject is None or sub == subject):
                out.append((sub, role, dom))
        return sorted(out)

    def policy_count(self) -> int:
        return len(self._enforcer.get_policy()) + len(self._enforcer.get_named_grouping_policy("g"))


def role_table_markdown() -> str:
    """What each role may do, as the markdown table the README embeds."""
    roles = ("platform-admin", *TENANT_ROLES, "service")
    lines = ["| Resource | Action | " + " | ".join(roles) + " |", "| --- | --- |" + " :-: |" * len(roles)]
    for resource, actions in RESOURCES.items():
        for action in actions:
            marks = ["✓" if (resource, action) in ROLE_PERMISSIONS[role] else "" for role in roles]
            lines.append(f"| {resource} | {action} | " + " | ".join(marks) + " |")
    return "\n".join(lines)
