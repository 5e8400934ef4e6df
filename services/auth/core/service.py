"""AuthCore: the auth service's domain operations (tenants, identities, tokens, roles, audit)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from opentelemetry import trace

from services.auth.core.policy import (
    PLATFORM_ROLES,
    ROLE_PERMISSIONS,
    TENANT_ROLES,
    PolicyEngine,
    role_policy_lines,
)
from services.auth.core.tokens import (
    KeyWrapper,
    SigningKey,
    SlowHasher,
    hash_token_secret,
    jwks_document,
    new_api_key_secret,
    new_id,
    new_refresh_secret,
    new_signing_key,
    parse_api_key_secret,
    parse_refresh_secret,
    secrets_equal,
    sign_access_token,
)
from services.auth.store import AuditRecord, AuthStore, PolicyLine
from services.mesh.config import SERVICE_NAMES
from services.mesh.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from services.mesh.identity import PLATFORM_TENANT, Principal

__all__ = ["AuthCore", "TokenPair", "TenantInfo", "PrincipalInfo", "ApiKeyInfo", "AuditPage", "Page"]

log = logging.getLogger(__name__)

_TENANT_NAME = re.compile(r"^[a-z][a-z0-9-]{1,38}[a-z0-9]$")
_USER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_TEXT = 200
_MIN_PASSWORD, _MAX_PASSWORD = 12, 256
_MAX_API_KEY_TTL = timedelta(days=366)
_DEFAULT_PAGE, _MAX_PAGE = 50, 1000
#: Longest stretch of policy evaluation a BatchCheckPermission runs before it lets the event loop serve other RPCs
#: for CHECK_PAUSE_SECONDS (a batch takes at most two thirds of the loop; single checks meanwhile stay ~ms).
CHECK_SLICE_SECONDS = 0.001
CHECK_PAUSE_SECONDS = 0.0005


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
class Page:
    items: list[Any]
    next_token: str


AuditPage = Page


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


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
    if _CONTROL.search(value):  # never in a token we issued; and PostgreSQL can't compare NUL
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


def _check_text(label: str, value: str) -> None:
    if len(value) > _MAX_TEXT:
        raise InvalidArgument(f"{label} is longer than {_MAX_TEXT} characters")
    if _CONTROL.search(value):
        raise InvalidArgument(f"{label} contains control characters")


def _current_trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def _subject(kind: str, tenant: str, name: str) -> str:
    return f"{'user' if kind == 'user' else 'sa'}:{tenant}/{name}"


class AuthCore:
    """Everything the auth service does, behind its RPCs."""

    def __init__(
        self,
        store: AuthStore,
        policy: PolicyEngine,
        key_wrapper: KeyWrapper,
        *,
        hasher: SlowHasher | None = None,
        access_ttl: timedelta = timedelta(minutes=15),
        refresh_ttl: timedelta = timedelta(days=7),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._policy = policy
        self._wrapper = key_wrapper
        self._hasher = hasher or SlowHasher()
        self._access_ttl = access_ttl
        self._refresh_ttl = refresh_ttl
        self._clock = clock
        self._keys: list[SigningKey] = []
        self._revoked_api_keys: set[str] = set()

    # -- start-up ------------------------------------------------------------------------------------
    def bootstrap(self, bootstrap_file: Path) -> bool:
        """Brings the stored state up to date: platform tenant, every tenant's role policies in line with
        ROLE_PERMISSIONS, mesh service bindings, a signing key, and, on the very first start, a platform
        admin whose one-time password is written to ``bootstrap_file`` (0600). Returns True on first start."""
        now = self._clock()
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
        rows = self._store.signing_keys()
        if not rows:
            self._add_signing_key(None)
        else:
            self._keys = [self._row_to_key(r) for r in rows]
        self._revoked_api_keys = self._store.revoked_api_key_ids()
        if first_start:
            password = secrets.token_urlsafe(18)
            subject = _subject("user", PLATFORM_TENANT, "admin")
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
            )
            self._policy.apply([binding])
            bootstrap_file.parent.mkdir(parents=True, exist_ok=True)
            bootstrap_file.touch(mode=0o600)
            bootstrap_file.write_text(json.dumps({"tenant": PLATFORM_TENANT, "user": "admin", "password": password}))
            log.warning("first start: platform admin created; its one-time password is in %s", bootstrap_file)
        return first_start

    def _row_to_key(self, row: Any) -> SigningKey:
        return SigningKey(
            kid=row.kid,
            private_key=self._wrapper.unwrap(row.kid, row.private_key),
            public_jwk=json.loads(row.public_jwk),
            created_at=_utc(row.created_at) or self._clock(),
            retired_at=_utc(row.retired_at),
        )

    def _add_signing_key(self, audit: AuditRecord | None) -> SigningKey:
        now = self._clock()
        key = new_signing_key(now)
        self._store.insert_signing_key(
            key.kid, self._wrapper.wrap(key.kid, key.private_key), json.dumps(key.public_jwk), now, audit
        )
        self._keys = [self._row_to_key(r) for r in self._store.signing_keys()]
        return key

    def _audit(self, actor: str, tenant: str, action: str, target: str, details: dict[str, Any]) -> AuditRecord:
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

    # -- permissions ---------------------------------------------------------------------------------
    def allowed(self, subject: str, tenant: str, resource: str, action: str) -> bool:
        return self._policy.allowed(subject, tenant, resource, action)

    def _require(self, caller: Principal, tenant: str, resource: str, action: str) -> None:
        if not self.allowed(caller.subject, tenant, resource, action):
            raise PermissionDenied(f"{caller.subject} may not {action} {resource} in tenant {tenant!r}")

    def check(self, caller: Principal, subject: str, tenant: str, resource: str, action: str) -> bool:
        """CheckPermission: anyone may ask about themselves; mesh services about anyone; others need
        roles:read in the tenant."""
        subject = subject or caller.subject
        if not tenant or not resource or not action:
            raise InvalidArgument("tenant, resource and action are required")
        if subject != caller.subject and caller.kind != "service":
            self._require(caller, tenant, "roles", "read")
        return self.allowed(subject, tenant, resource, action)

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

    def ensure_active(self, principal: Principal) -> Principal:
        """Rejects tokens obtained with an API key that has since been revoked."""
        if principal.api_key_id and principal.api_key_id in self._revoked_api_keys:
            raise Unauthenticated("the API key behind this token was revoked")
        return principal

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
        _check_text("display_name", display_name)
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
        return TenantInfo(row.name, row.display_name, _utc(row.created_at) or self._clock())

    def list_tenants(self, caller: Principal, page_size: int, page_token: str) -> Page:
        limit = _page_size(page_size)
        if not self.allowed(caller.subject, PLATFORM_TENANT, "tenants", "read"):
            return Page([self.get_tenant(caller.tenant)] if not page_token else [], "")
        rows = self._store.list_tenants(_decode_token(page_token), limit + 1)
        items = [TenantInfo(r.name, r.display_name, _utc(r.created_at) or self._clock()) for r in rows[:limit]]
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
        if kind == "user" and not _MIN_PASSWORD <= len(password) <= _MAX_PASSWORD:
            raise InvalidArgument(f"password must be {_MIN_PASSWORD} to {_MAX_PASSWORD} characters")
        wanted_roles = self._check_roles(tenant, roles)
        if wanted_roles:
            self._require(caller, tenant, "roles", "write")
        subject = _subject(kind, tenant, name)
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
        items = [
            PrincipalInfo(r.subject, r.tenant, r.name, r.kind, _utc(r.created_at) or self._clock())
            for r in rows[:limit]
        ]
        return Page(items, _encode_token(items[-1].subject) if len(rows) > limit else "")

    # -- API keys ------------------------------------------------------------------------------------
    async def create_api_key(
        self, caller: Principal, tenant: str, subject: str, description: str, ttl_seconds: int
    ) -> tuple[ApiKeyInfo, str]:
        self._tenant_exists(tenant)
        subject = subject or caller.subject
        _check_text("description", description)
        if ttl_seconds < 0 or timedelta(seconds=ttl_seconds) > _MAX_API_KEY_TTL:
            raise InvalidArgument("ttl_seconds must be between 0 (no expiry) and 366 days")
        row = self._store.get_principal(subject)
        if row is None or row.tenant != tenant:
            raise NotFound(f"{subject} not found in tenant {tenant!r}")
        if subject != caller.subject:
            self._require(caller, tenant, "users", "write")
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
            _utc(row.created_at) or self._clock(),
            _utc(row.expires_at),
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
            self._store.revoke_api_key(
                key_id,
                self._clock(),
                self._audit(caller.subject, tenant, "apikey.revoke", f"apikey:{key_id}", {"subject": row.subject}),
            )
            self._revoked_api_keys.add(key_id)
        return self._api_key_info(self._store.get_api_key(key_id))

    # -- tokens --------------------------------------------------------------------------------------
    def _active_key(self) -> SigningKey:
        return next(k for k in reversed(self._keys) if k.retired_at is None)

    def _access_token(self, subject: str, tenant: str, kind: str, api_key_id: str = "") -> tuple[str, datetime]:
        claims: dict[str, Any] = {"sub": subject, "tid": tenant, "knd": kind}
        if api_key_id:
            claims["akid"] = api_key_id
        return sign_access_token(self._active_key(), claims, self._clock(), self._access_ttl)

    def _new_refresh(self, subject: str, tenant: str, family_id: str) -> tuple[str, datetime]:
        token_id, secret, full = new_refresh_secret()
        now = self._clock()
        expires = now + self._refresh_ttl
        self._store.insert_refresh_token(token_id, family_id, subject, tenant, hash_token_secret(secret), now, expires)
        return full, expires

    async def login(self, tenant: str, name: str, password: str) -> TokenPair:
        if not tenant or not name or not password:
            raise InvalidArgument("tenant, name and password are required")
        # Names no account can have are refused before the failure audit (which would have to store them).
        if len(password) > _MAX_PASSWORD or len(name) > 64 or len(tenant) > 40 or _CONTROL.search(tenant + name):
            raise Unauthenticated("wrong tenant, name or password")
        subject = _subject("user", tenant, name)
        row = self._store.get_principal(subject)
        stored = row.password_hash if row is not None and row.kind == "user" else None
        if not await asyncio.to_thread(self._hasher.verify, stored, password):
            self._store.record_audit(self._audit(subject, tenant, "login.failure", subject, {}))
            raise Unauthenticated("wrong tenant, name or password")
        access, access_expires = self._access_token(subject, tenant, "user")
        refresh, refresh_expires = self._new_refresh(subject, tenant, new_id())
        return TokenPair(access, access_expires, refresh, refresh_expires)

    async def exchange_api_key(self, value: str) -> TokenPair:
        if not value:
            raise InvalidArgument("api_key is required")
        parsed = parse_api_key_secret(value)
        if parsed is None:
            raise Unauthenticated("malformed API key")
        key_id, secret = parsed
        row = self._store.get_api_key(key_id)
        if not await asyncio.to_thread(self._hasher.verify, row.secret_hash if row else None, secret) or row is None:
            raise Unauthenticated("unknown API key")
        if row.revoked_at is not None:
            raise Unauthenticated("API key revoked")
        expires_at = _utc(row.expires_at)
        if expires_at is not None and expires_at <= self._clock():
            raise Unauthenticated("API key expired")
        principal = self._store.get_principal(row.subject)
        if principal is None:
            raise Unauthenticated("the API key's subject no longer exists")
        access, access_expires = self._access_token(row.subject, row.tenant, principal.kind, key_id)
        return TokenPair(access, access_expires)

    def refresh(self, value: str) -> TokenPair:
        if not value:
            raise InvalidArgument("refresh_token is required")
        parsed = parse_refresh_secret(value)
        if parsed is None:
            raise Unauthenticated("malformed refresh token")
        token_id, secret = parsed
        row = self._store.get_refresh_token(token_id)
        if row is None or not secrets_equal(row.secret_hash, hash_token_secret(secret)):
            raise Unauthenticated("unknown refresh token")
        if row.revoked:
            raise Unauthenticated("refresh token revoked")
        if (_utc(row.expires_at) or self._clock()) <= self._clock():
            raise Unauthenticated("refresh token expired")
        if not self._store.use_refresh_token(token_id, self._clock()):
            self._store.revoke_refresh_family(
                row.family_id,
                self._audit(row.subject, row.tenant, "token.reuse_detected", row.subject, {"family": row.family_id}),
            )
            raise Unauthenticated("refresh token reused: every token of this login was revoked")
        access, access_expires = self._access_token(row.subject, row.tenant, "user")
        refresh, refresh_expires = self._new_refresh(row.subject, row.tenant, row.family_id)
        return TokenPair(access, access_expires, refresh, refresh_expires)

    def jwks(self) -> str:
        return jwks_document(self._keys, self._clock(), self._access_ttl + timedelta(minutes=5))

    def rotate_signing_key(self, caller: Principal) -> str:
        key = self._add_signing_key(None)
        self._store.record_audit(
            self._audit(caller.subject, PLATFORM_TENANT, "signing_key.rotate", f"key:{key.kid}", {})
        )
        return key.kid

    # -- roles ---------------------------------------------------------------------------------------
    def _binding(self, subject: str, role: str, tenant: str) -> PolicyLine:
        if not subject or not role or not tenant:
            raise InvalidArgument("subject, role and tenant are required")
        # Service subjects go into the policy unchecked below: keep them within what the column holds.
        _check_text("subject", subject)
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
                _utc(r.time) or self._clock(),
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
