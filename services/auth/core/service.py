"""AuthCore: the auth service's directory and policy (tenants, users, service accounts, API keys, roles, audit).
Issuing and ending tokens is SessionCore's (sessions.py); AuthCore holds it and tells it what a change revokes."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.auth.core.policy import (
    PLATFORM_ROLES,
    ROLE_PERMISSIONS,
    TENANT_ROLES,
    PolicyEngine,
    role_policy_lines,
)
from services.auth.core.records import (
    CONTROL,
    ApiKeyInfo,
    Auditor,
    AuditPage,
    Page,
    PrincipalInfo,
    TenantInfo,
    TokenPair,
    check_new_password,
    check_text,
    subject_of,
    utc,
)
from services.auth.core.sessions import SessionCore
from services.auth.core.tokens import new_api_key_secret
from services.auth.metrics import AuthMetrics
from services.auth.store import AuditRecord, AuthStore, PolicyLine
from services.mesh.config import SERVICE_NAMES
from services.mesh.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.mesh.identity import PLATFORM_TENANT, Principal, outside_binding

__all__ = ["AuthCore", "TokenPair", "TenantInfo", "PrincipalInfo", "ApiKeyInfo", "AuditPage", "Page"]

log = logging.getLogger(__name__)

_TENANT_NAME = re.compile(r"^[a-z][a-z0-9-]{1,38}[a-z0-9]$")
_USER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_MAX_API_KEY_TTL = timedelta(days=366)
_DEFAULT_PAGE, _MAX_PAGE = 50, 1000
#: Longest stretch of policy evaluation a BatchCheckPermission runs before it lets the event loop serve other RPCs
#: for CHECK_PAUSE_SECONDS (a batch takes at most two thirds of the loop; single checks meanwhile stay ~ms).
CHECK_SLICE_SECONDS = 0.001
CHECK_PAUSE_SECONDS = 0.0005


def _page_size(size: int) -> int:
    if size < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(size or _DEFAULT_PAGE, _MAX_PAGE)


def _encode_token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode() if value else ""


def _decode_token(token: str) -> str:
    if not token:
        return ""
    try:
        value = base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("malformed page_token") from None
    if CONTROL.search(value):  # never in a token we issued; and PostgreSQL can't compare NUL
        raise InvalidArgument("malformed page_token")
    return value


def _check_tenant_name(name: str) -> None:
    if not name:
        raise InvalidArgument("tenant name is required")
    if not _TENANT_NAME.match(name):
        raise InvalidArgument(
            "tenant name must be 3-40 characters of lowercase letters, digits and '-', starting with a letter"
        )


def _check_user_name(name: str) -> None:
    if not name:
        raise InvalidArgument("name is required")
    if not _USER_NAME.match(name):
        raise InvalidArgument("name must be 1-64 characters of lowercase letters, digits, '.', '_' and '-'")


class AuthCore:
    """Everything the auth service does, behind its RPCs."""

    def __init__(
        self,
        store: AuthStore,
        policy: PolicyEngine,
        sessions: SessionCore,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: AuthMetrics | None = None,
    ) -> None:
        self._store = store
        self._policy = policy
        self._metrics = metrics or AuthMetrics()
        self.sessions = sessions
        self._hasher = sessions.hasher
        self._clock = clock
        self._audit = Auditor(clock)

    # -- start-up ------------------------------------------------------------------------------------
    def bootstrap(self, bootstrap_file: Path) -> bool:
        """Brings the stored state up to date: platform tenant, every tenant's role policies in line with
        ROLE_PERMISSIONS, mesh service bindings, a signing key, and, on the very first start, a platform
        admin whose one-time password is written to ``bootstrap_file`` (0600). That password is expired from the
        start: it logs in once, in a login that sets a new password. Returns True on first start."""
        now = self._clock()
        self._store.mark_loaded()  # before loading: whatever changes from here on is reloaded by sync()
        self._policy.reload()
        first_start = self._store.get_tenant(PLATFORM_TENANT) is None
        if first_start:
            self._store.create_tenant(
                PLATFORM_TENANT,
                "Platform operators",
                now,
                [],
                self._audit("system", PLATFORM_TENANT, "tenant.create", f"tenant:{PLATFORM_TENANT}", {}),
            )
        tenants = [PLATFORM_TENANT] + [
            t.name for t in self._store.list_tenants("", 1_000_000) if t.name != PLATFORM_TENANT
        ]
        wanted: list[PolicyLine] = [line for t in tenants for line in role_policy_lines(t)]
        wanted += [("g", f"service:{name}", "service", PLATFORM_TENANT) for name in SERVICE_NAMES]
        wanted_set = set(wanted)
        stale = [tuple(line) for line in self._store.policy_lines() if line[0] == "p" and tuple(line) not in wanted_set]
        missing = [line for line in wanted if not self._policy.has_line(line)]
        if missing or stale:
            self._store.change_policy(
                missing,
                stale,
                self._audit(
                    "system",
                    PLATFORM_TENANT,
                    "policy.sync",
                    "roles",
                    {"added": len(missing), "removed": len(stale)},
                ),
            )
            self._policy.apply(missing, stale)
        self.sessions.start()
        if first_start:
            password = secrets.token_urlsafe(18)
            subject = subject_of("user", PLATFORM_TENANT, "admin")
            binding = ("g", subject, "platform-admin", PLATFORM_TENANT)
            self._store.create_principal(
                subject,
                PLATFORM_TENANT,
                "admin",
                "user",
                self._hasher.hash(password),
                now,
                [binding],
                self._audit("system", PLATFORM_TENANT, "user.create", subject, {"roles": ["platform-admin"]}),
                password_expires_at=now,
            )
            self._policy.apply([binding])
            bootstrap_file.parent.mkdir(parents=True, exist_ok=True)
            bootstrap_file.touch(mode=0o600)
            bootstrap_file.write_text(json.dumps({"tenant": PLATFORM_TENANT, "user": "admin", "password": password}))
            log.warning("first start: platform admin created; its one-time password is in %s", bootstrap_file)
        return first_start

    async def sync(self) -> set[str]:
        """Reloads the state other replicas changed (policy, signing keys, revocations); returns what it reloaded.
        Called every AIDC_AUTH_SYNC_SECONDS: a change made through one replica applies in the others within that."""
        changed = await asyncio.to_thread(self._store.changed_elsewhere)
        if "policy" in changed:
            self._policy.reload()
        if "keys" in changed:
            self.sessions.reload_keys()
        if "revocations" in changed:
            self.sessions.reload_revocations()
        if changed:
            log.info("reloaded what another replica changed: %s", ", ".join(sorted(changed)))
        return changed

    # -- permissions ---------------------------------------------------------------------------------
    def allowed(self, subject: str, tenant: str, resource: str, action: str) -> bool:
        return self._policy.allowed(subject, tenant, resource, action)

    def allowed_for(self, caller: Principal, tenant: str, resource: str, action: str) -> bool:
        """The caller's decision: its subject's, and never outside the tenant its token is bound to."""
        return not outside_binding(caller, tenant) and self.allowed(caller.subject, tenant, resource, action)

    def _require(self, caller: Principal, tenant: str, resource: str, action: str) -> None:
        if not self.allowed_for(caller, tenant, resource, action):
            raise PermissionDenied(f"{caller.subject} may not {action} {resource} in tenant {tenant!r}")

    def _require_may_act_for(self, caller: Principal, tenant: str, subject: str, what: str) -> None:
        """Acting on another subject's credentials needs users:write in its tenant and the right to grant every role
        it holds, wherever it holds it (a platform-domain role needs roles:write in the platform domain)."""
        if subject == caller.subject:
            return
        self._require(caller, tenant, "users", "write")
        for _, role, domain in self._policy.bindings(None, subject):
            if not self.allowed_for(caller, domain, "roles", "write"):
                raise PermissionDenied(
                    f"{caller.subject} may not {what} {subject}: it holds role {role} in {domain!r}, "
                    f"which {caller.subject} may not grant"
                )

    def check(self, caller: Principal, subject: str, tenant: str, resource: str, action: str) -> bool:
        """CheckPermission: anyone may ask about themselves; mesh services about anyone; others need
        roles:read in the tenant."""
        subject = subject or caller.subject
        if not tenant or not resource or not action:
            raise InvalidArgument("tenant, resource and action are required")
        if subject == caller.subject:
            decision = self.allowed_for(caller, tenant, resource, action)
        else:
            if caller.kind != "service":
                self._require(caller, tenant, "roles", "read")
            decision = self.allowed(subject, tenant, resource, action)
        (self._metrics.allowed if decision else self._metrics.denied).inc()
        return decision

    async def check_all(self, caller: Principal, checks: Sequence[tuple[str, str, str, str]]) -> list[bool]:
        """BatchCheckPermission: ``check`` for each (subject, tenant, resource, action), in order.

        Casbin's enforcer is not thread-safe, so evaluation stays on the event loop, which it hands back for
        CHECK_PAUSE_SECONDS after every CHECK_SLICE_SECONDS: a large batch delays the other RPCs auth serves by about
        a slice, not by the whole batch (measured in tests/bench/bench_auth.py).
        """
        decisions = []
        slice_ends = time.monotonic() + CHECK_SLICE_SECONDS
        for subject, tenant, resource, action in checks:
            decisions.append(self.check(caller, subject, tenant, resource, action))
            if time.monotonic() >= slice_ends:
                await asyncio.sleep(CHECK_PAUSE_SECONDS)
                slice_ends = time.monotonic() + CHECK_SLICE_SECONDS
        return decisions

    # -- tenants -------------------------------------------------------------------------------------
    def _tenant_exists(self, tenant: str) -> None:
        if not tenant:
            raise InvalidArgument("tenant is required")
        if self._store.get_tenant(tenant) is None:
            raise NotFound(f"tenant {tenant!r} not found")

    def create_tenant(self, caller: Principal, name: str, display_name: str) -> TenantInfo:
        _check_tenant_name(name)
        if name == PLATFORM_TENANT:
            raise InvalidArgument(f"{PLATFORM_TENANT!r} is reserved")
        check_text("display_name", display_name)
        if self._store.get_tenant(name) is not None:
            raise AlreadyExists(f"tenant {name!r} already exists")
        now = self._clock()
        lines = role_policy_lines(name)
        self._store.create_tenant(
            name,
            display_name or name,
            now,
            lines,
            self._audit(caller.subject, name, "tenant.create", f"tenant:{name}", {}),
        )
        self._policy.apply(lines)
        return TenantInfo(name, display_name or name, now)

    def get_tenant(self, name: str) -> TenantInfo:
        _check_tenant_name(name) if name != PLATFORM_TENANT else None
        row = self._store.get_tenant(name)
        if row is None:
            raise NotFound(f"tenant {name!r} not found")
        return TenantInfo(row.name, row.display_name, utc(row.created_at) or self._clock())

    def list_tenants(self, caller: Principal, page_size: int, page_token: str) -> Page:
        limit = _page_size(page_size)
        if not self.allowed(caller.subject, PLATFORM_TENANT, "tenants", "read"):
            return Page([self.get_tenant(caller.tenant)] if not page_token else [], "")
        rows = self._store.list_tenants(_decode_token(page_token), limit + 1)
        items = [TenantInfo(r.name, r.display_name, utc(r.created_at) or self._clock()) for r in rows[:limit]]
        return Page(items, _encode_token(items[-1].name) if len(rows) > limit else "")

    # -- principals ----------------------------------------------------------------------------------
    def _check_roles(self, tenant: str, roles: Sequence[str]) -> list[str]:
        allowed = PLATFORM_ROLES if tenant == PLATFORM_TENANT else TENANT_ROLES
        for role in roles:
            if role not in allowed:
                raise InvalidArgument(f"unknown role {role!r} for tenant {tenant!r}; roles: {', '.join(allowed)}")
        return sorted(set(roles))

    async def create_principal(
        self, caller: Principal, kind: str, tenant: str, name: str, password: str, roles: Sequence[str]
    ) -> PrincipalInfo:
        self._tenant_exists(tenant)
        _check_user_name(name)
        if kind == "user":
            check_new_password(password)
        wanted_roles = self._check_roles(tenant, roles)
        if wanted_roles:
            self._require(caller, tenant, "roles", "write")
        subject = subject_of(kind, tenant, name)
        if self._store.get_principal(subject) is not None:
            raise AlreadyExists(f"{subject} already exists")
        password_hash = await asyncio.to_thread(self._hasher.hash, password) if kind == "user" else None
        now = self._clock()
        lines: list[PolicyLine] = [("g", subject, role, tenant) for role in wanted_roles]
        self._store.create_principal(
            subject,
            tenant,
            name,
            kind,
            password_hash,
            now,
            lines,
            self._audit(
                caller.subject,
                tenant,
                f"{'user' if kind == 'user' else 'service_account'}.create",
                subject,
                {"roles": wanted_roles},
            ),
        )
        self._policy.apply(lines)
        return PrincipalInfo(subject, tenant, name, kind, now)

    def list_principals(self, tenant: str, page_size: int, page_token: str) -> Page:
        self._tenant_exists(tenant)
        limit = _page_size(page_size)
        rows = self._store.list_principals(tenant, _decode_token(page_token), limit + 1)
        items = [self._principal_info(r) for r in rows[:limit]]
        return Page(items, _encode_token(items[-1].subject) if len(rows) > limit else "")

    def _principal_info(self, row: Any) -> PrincipalInfo:
        return PrincipalInfo(
            row.subject,
            row.tenant,
            row.name,
            row.kind,
            utc(row.created_at) or self._clock(),
            row.disabled_at is not None,
        )

    def _own_principal(self, tenant: str, subject: str) -> Any:
        self._tenant_exists(tenant)
        if not subject:
            raise InvalidArgument("subject is required")
        row = self._store.get_principal(subject)
        if row is None or row.tenant != tenant:
            raise NotFound(f"{subject} not found in tenant {tenant!r}")
        return row

    def set_disabled(self, caller: Principal, tenant: str, subject: str, disabled: bool) -> PrincipalInfo:
        """Disables a user or service account (every token of it issued until now is refused, its job delegations
        are revoked, it can no longer log in or use its API keys) or enables it again. Idempotent."""
        row = self._own_principal(tenant, subject)
        if subject == caller.subject:
            raise FailedPrecondition("you cannot disable or enable yourself")
        self._require_may_act_for(caller, tenant, subject, "disable or enable")
        if (row.disabled_at is not None) != disabled:
            now = self._clock()
            action = "user.disable" if disabled else "user.enable"
            self._store.set_disabled(
                subject,
                now if disabled else None,
                self._audit(caller.subject, tenant, action, subject, {}),
                revoke_delegations=disabled,
            )
            if disabled:
                self.sessions.revoked(subject, now)
        return self._principal_info(self._store.get_principal(subject))

    # -- API keys ------------------------------------------------------------------------------------
    async def create_api_key(
        self, caller: Principal, tenant: str, subject: str, description: str, ttl_seconds: int
    ) -> tuple[ApiKeyInfo, str]:
        self._tenant_exists(tenant)
        subject = subject or caller.subject
        check_text("description", description)
        if ttl_seconds < 0 or timedelta(seconds=ttl_seconds) > _MAX_API_KEY_TTL:
            raise InvalidArgument("ttl_seconds must be between 0 (no expiry) and 366 days")
        if caller.credential.startswith("dg:"):
            raise PermissionDenied("a job delegation cannot create API keys")
        row = self._store.get_principal(subject)
        if row is None or row.tenant != tenant:
            raise NotFound(f"{subject} not found in tenant {tenant!r}")
        self._require_may_act_for(caller, tenant, subject, "create API keys for")
        key_id, secret, full = new_api_key_secret()
        secret_hash = await asyncio.to_thread(self._hasher.hash, secret)
        now = self._clock()
        expires = now + timedelta(seconds=ttl_seconds) if ttl_seconds else None
        self._store.create_api_key(
            key_id,
            subject,
            tenant,
            secret_hash,
            description,
            now,
            expires,
            self._audit(caller.subject, tenant, "apikey.create", f"apikey:{key_id}", {"subject": subject}),
        )
        return ApiKeyInfo(key_id, subject, tenant, description, now, expires, False), full

    def _api_key_info(self, row: Any) -> ApiKeyInfo:
        return ApiKeyInfo(
            row.key_id,
            row.subject,
            row.tenant,
            row.description,
            utc(row.created_at) or self._clock(),
            utc(row.expires_at),
            row.revoked_at is not None,
        )

    def list_api_keys(self, tenant: str, page_size: int, page_token: str) -> Page:
        self._tenant_exists(tenant)
        limit = _page_size(page_size)
        rows = self._store.list_api_keys(tenant, _decode_token(page_token), limit + 1)
        items = [self._api_key_info(r) for r in rows[:limit]]
        return Page(items, _encode_token(items[-1].key_id) if len(rows) > limit else "")

    def revoke_api_key(self, caller: Principal, tenant: str, key_id: str) -> ApiKeyInfo:
        self._tenant_exists(tenant)
        if not key_id:
            raise InvalidArgument("key_id is required")
        row = self._store.get_api_key(key_id)
        if row is None or row.tenant != tenant:
            raise NotFound(f"API key {key_id!r} not found in tenant {tenant!r}")
        if row.subject != caller.subject:
            self._require(caller, tenant, "users", "write")
        if row.revoked_at is None:
            now = self._clock()
            self._store.revoke_api_key(
                key_id,
                now,
                self._audit(caller.subject, tenant, "apikey.revoke", f"apikey:{key_id}", {"subject": row.subject}),
            )
            self.sessions.revoked(f"ak:{key_id}", now)
        return self._api_key_info(self._store.get_api_key(key_id))

    # -- roles ---------------------------------------------------------------------------------------
    def _binding(self, subject: str, role: str, tenant: str) -> PolicyLine:
        if not subject or not role or not tenant:
            raise InvalidArgument("subject, role and tenant are required")
        # Service subjects go into the policy unchecked below: keep them within what the column holds.
        check_text("subject", subject)
        if tenant != PLATFORM_TENANT:
            self._tenant_exists(tenant)
        self._check_roles(tenant, [role])
        row = self._store.get_principal(subject)
        if subject.startswith("service:") and tenant == PLATFORM_TENANT:
            return ("g", subject, role, tenant)
        if row is None:
            raise NotFound(f"{subject} not found")
        if row.tenant != tenant and tenant != PLATFORM_TENANT:
            raise FailedPrecondition(f"{subject} belongs to tenant {row.tenant!r}, not {tenant!r}")
        return ("g", subject, role, tenant)

    def assign_role(self, caller: Principal, subject: str, role: str, tenant: str) -> None:
        line = self._binding(subject, role, tenant)
        self._require(caller, tenant, "roles", "write")
        if self._policy.has_line(line):
            raise AlreadyExists(f"{subject} already has role {role} in {tenant}")
        self._store.change_policy(
            [line], [], self._audit(caller.subject, tenant, "role.assign", subject, {"role": role})
        )
        self._policy.apply([line])

    def revoke_role(self, caller: Principal, subject: str, role: str, tenant: str) -> None:
        line = self._binding(subject, role, tenant)
        self._require(caller, tenant, "roles", "write")
        if not self._policy.has_line(line):
            raise NotFound(f"{subject} has no role {role} in {tenant}")
        self._store.change_policy(
            [], [line], self._audit(caller.subject, tenant, "role.revoke", subject, {"role": role})
        )
        self._policy.apply([], [line])

    def bindings(self, tenant: str | None, subject: str | None = None) -> list[tuple[str, str, str]]:
        return self._policy.bindings(tenant, subject)

    # -- audit ---------------------------------------------------------------------------------------
    def list_audit(self, caller: Principal, tenant: str, page_size: int, page_token: str) -> Page:
        limit = _page_size(page_size)
        if not tenant and not self.allowed(caller.subject, PLATFORM_TENANT, "audit", "read"):
            tenant = caller.tenant
        if tenant:
            self._require(caller, tenant, "audit", "read")
        before = _decode_token(page_token)
        if before and not before.isdigit():
            raise InvalidArgument("malformed page_token")
        rows = self._store.list_audit(tenant or None, int(before) if before else None, limit + 1)
        items = [
            AuditRecord(
                r.id,
                utc(r.time) or self._clock(),
                r.actor,
                r.tenant,
                r.action,
                r.target,
                r.trace_id,
                json.loads(r.details_json),
            )
            for r in rows[:limit]
        ]
        return Page(items, _encode_token(str(rows[limit - 1].seq)) if len(rows) > limit else "")

    @staticmethod
    def role_permissions() -> dict[str, list[tuple[str, str]]]:
        return ROLE_PERMISSIONS
