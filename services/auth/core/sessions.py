"""SessionCore: everything that issues or ends tokens — password logins (with the change an expired password
needs), refresh rotation within a login's absolute lifetime, logout, API-key exchange, job delegations, password
changes, the signing keys and the revocation list.

Every access token names the credential it was issued for ("rf:<login>", "ak:<key>", "dg:<delegation>"). Ending a
credential, or disabling a subject, records a revocation: tokens of that credential (or subject) issued before it
are refused — here at once, in every other service within AIDC_REVOCATION_REFRESH_SECONDS (they refetch the list).
A revocation is published for as long as tokens it concerns can be unexpired (the access-token lifetime plus
twice the verifiers' clock leeway), and so is a retired signing key.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from services.auth.core.limits import LoginThrottle
from services.auth.core.records import (
    CONTROL,
    MAX_PASSWORD,
    Auditor,
    DelegationInfo,
    TokenPair,
    check_new_password,
    subject_of,
    utc,
)
from services.auth.core.tokens import (
    KeyWrapper,
    SigningKey,
    SlowHasher,
    hash_token_secret,
    jwks_document,
    new_delegation_secret,
    new_id,
    new_refresh_secret,
    new_signing_key,
    parse_api_key_secret,
    parse_delegation_secret,
    parse_refresh_secret,
    secrets_equal,
    sign_access_token,
)
from services.auth.store import AuthStore
from services.mesh.config import SERVICE_NAMES
from services.mesh.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from services.mesh.identity import PLATFORM_TENANT, TOKEN_LEEWAY_SECONDS, Principal, revocation_of

__all__ = ["SessionCore"]

log = logging.getLogger(__name__)

_WRONG_PASSWORD = "wrong tenant, name or password"
_MAX_JOB_ID = 128


class SessionCore:
    """Tokens and the credentials behind them (see the module docstring)."""

    def __init__(
        self,
        store: AuthStore,
        key_wrapper: KeyWrapper,
        *,
        hasher: SlowHasher | None = None,
        throttle: LoginThrottle | None = None,
        access_ttl: timedelta = timedelta(minutes=15),
        refresh_ttl: timedelta = timedelta(days=7),
        login_max_age: timedelta = timedelta(days=30),
        delegation_ttl: timedelta = timedelta(days=30),
        delegates_need_certificates: bool = False,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._wrapper = key_wrapper
        self.hasher = hasher or SlowHasher()
        self._throttle = throttle or LoginThrottle()
        self._access_ttl = access_ttl
        self._refresh_ttl = refresh_ttl
        self._login_max_age = login_max_age
        self._delegation_ttl = delegation_ttl
        self._delegates_need_certificates = delegates_need_certificates
        self._clock = clock
        self._audit = Auditor(clock)
        self._keys: list[SigningKey] = []
        #: Grows whenever the signing keys change (rotated here, or reloaded after another replica rotated them).
        self.keys_generation = 0
        # credential or subject -> tokens issued before this time (epoch seconds) are refused
        self._revoked: dict[str, float] = {}

    @property
    def token_window(self) -> timedelta:
        """How long after a key's retirement or a revocation tokens it concerns can still be accepted somewhere."""
        return self._access_ttl + timedelta(seconds=2 * TOKEN_LEEWAY_SECONDS)

    def start(self) -> None:
        """Loads the signing keys (creating the first one) and the revocations still in force."""
        rows = self._store.signing_keys()
        if not rows:
            self._add_signing_key()
        else:
            self._set_keys(rows)
        self.reload_revocations()

    def reload_keys(self) -> None:
        """Takes the signing keys as stored (another replica rotated them)."""
        self._set_keys(self._store.signing_keys())

    def _set_keys(self, rows: Any) -> None:
        self._keys = [self._row_to_key(r) for r in rows]
        self.keys_generation += 1

    def reload_revocations(self) -> None:
        """Takes the revocations still in force as stored (another replica added some)."""
        since = self._clock() - self.token_window
        for credential, issued_before in self._store.revocations_since(since).items():
            self._revoked[credential] = max(self._revoked.get(credential, 0.0), issued_before.timestamp())

    # -- signing keys --------------------------------------------------------------------------------
    def _row_to_key(self, row: Any) -> SigningKey:
        return SigningKey(
            kid=row.kid,
            private_key=self._wrapper.unwrap(row.kid, row.private_key),
            public_jwk=json.loads(row.public_jwk),
            created_at=utc(row.created_at) or self._clock(),
            retired_at=utc(row.retired_at),
        )

    def _add_signing_key(self) -> SigningKey:
        now = self._clock()
        key = new_signing_key(now)
        self._store.insert_signing_key(
            key.kid, self._wrapper.wrap(key.kid, key.private_key), json.dumps(key.public_jwk), now, None
        )
        self._set_keys(self._store.signing_keys())
        return key

    def _active_key(self) -> SigningKey:
        return next(k for k in reversed(self._keys) if k.retired_at is None)

    def jwks(self) -> str:
        return jwks_document(self._keys, self._clock(), self.token_window)

    def rotate_signing_key(self, caller: Principal) -> str:
        key = self._add_signing_key()
        self._store.record_audit(
            self._audit(caller.subject, PLATFORM_TENANT, "signing_key.rotate", f"key:{key.kid}", {})
        )
        return key.kid

    # -- revocations ---------------------------------------------------------------------------------
    def revocations(self) -> dict[str, float]:
        """Revocations whose tokens may still be unexpired (credential or subject -> issued-before, epoch s)."""
        horizon = (self._clock() - self.token_window).timestamp()
        for name in [n for n, t in self._revoked.items() if t <= horizon]:
            del self._revoked[name]
        return dict(self._revoked)

    def revoked(self, credential: str, at: datetime) -> None:
        """Notes a revocation just committed to the store (this process refuses its tokens at once)."""
        self._revoked[credential] = at.timestamp()

    def ensure_active(self, principal: Principal) -> Principal:
        """Refuses a verified token whose credential or subject was revoked after it was issued."""
        reason = revocation_of(principal, self._revoked)
        if reason is not None:
            raise Unauthenticated(reason)
        return principal

    # -- access tokens -------------------------------------------------------------------------------
    def _access_token(
        self, subject: str, tenant: str, kind: str, credential: str, bound_tenant: str = ""
    ) -> tuple[str, datetime]:
        claims: dict[str, Any] = {"sub": subject, "tid": tenant, "knd": kind, "cid": credential}
        if bound_tenant:
            claims["btn"] = bound_tenant
        return sign_access_token(self._active_key(), claims, self._clock(), self._access_ttl)

    def _new_refresh(self, subject: str, tenant: str, family_id: str, family_end: datetime) -> tuple[str, datetime]:
        token_id, secret, full = new_refresh_secret()
        now = self._clock()
        expires = min(now + self._refresh_ttl, family_end)
        self._store.insert_refresh_token(
            token_id, family_id, subject, tenant, hash_token_secret(secret), now, expires, family_end
        )
        return full, expires

    def _login_pair(self, subject: str, tenant: str, family_id: str, family_end: datetime) -> TokenPair:
        access, access_expires = self._access_token(subject, tenant, "user", f"rf:{family_id}")
        refresh, refresh_expires = self._new_refresh(subject, tenant, family_id, family_end)
        return TokenPair(access, access_expires, refresh, refresh_expires)

    # -- passwords -----------------------------------------------------------------------------------
    async def _check_password(self, source: str, subject: str, tenant: str, password: str) -> Any:
        """The user's row when ``password`` is its password; Unauthenticated (audited, throttled) otherwise."""
        self._throttle.admit(source, subject)
        row = self._store.get_principal(subject)
        stored = row.password_hash if row is not None and row.kind == "user" else None
        if await asyncio.to_thread(self.hasher.verify, stored, password):
            self._throttle.succeeded(subject)
            return row
        self._failed(source, subject, tenant if row is not None else "", "login.failure")
        raise Unauthenticated(_WRONG_PASSWORD)

    def _failed(self, source: str, account: str, tenant: str, action: str) -> None:
        """Counts a failed check. Its audit event goes to the account's tenant (known accounts only: a name no
        account has would let anyone write rows); a block on the source goes to the platform's audit log once."""
        blocks = self._throttle.failed(source, account)
        if tenant:
            details: dict[str, Any] = {"source": source}
            for block in blocks:
                if block.on == "account":
                    details["blocked_seconds"] = block.seconds
            self._store.record_audit(self._audit(account, tenant, action, account, details))
        for block in blocks:
            if block.on == "source":
                log.warning("blocking %s for %.0fs after repeated failed logins", source, block.seconds)
                self._store.record_audit(
                    self._audit(
                        "system", PLATFORM_TENANT, "login.throttled", f"source:{source}", {"seconds": block.seconds}
                    )
                )

    async def _set_password(
        self, subject: str, tenant: str, current: str, new: str, keep_family: str | None
    ) -> list[str]:
        """Replaces the password, ending the subject's logins except ``keep_family``; the logins it ended."""
        if new == current:
            raise InvalidArgument("new_password must differ from the current password")
        now = self._clock()
        ended = [f for f in self._store.live_families(subject, now) if f != keep_family]
        password_hash = await asyncio.to_thread(self.hasher.hash, new)
        self._store.set_password(
            subject,
            password_hash,
            now,
            ended,
            self._audit(subject, tenant, "password.change", subject, {"ended_logins": len(ended)}),
        )
        for family in ended:
            self.revoked(f"rf:{family}", now)
        return ended

    async def login(self, tenant: str, name: str, password: str, new_password: str = "", source: str = "") -> TokenPair:
        if not tenant or not name or not password:
            raise InvalidArgument("tenant, name and password are required")
        if new_password:
            check_new_password(new_password, "new_password")
        # Names no account can have are refused before the failure audit (which would have to store them).
        if len(password) > MAX_PASSWORD or len(name) > 64 or len(tenant) > 40 or CONTROL.search(tenant + name):
            raise Unauthenticated(_WRONG_PASSWORD)
        subject = subject_of("user", tenant, name)
        row = await self._check_password(source, subject, tenant, password)
        if row.disabled_at is not None:
            raise Unauthenticated("this account is disabled")
        expires = utc(row.password_expires_at)
        if expires is not None and expires <= self._clock() and not new_password:
            raise FailedPrecondition(
                "the password has expired (a first-start password works once): log in again giving a new password "
                "(LoginRequest.new_password; `aidc login` asks for it)"
            )
        if new_password:
            await self._set_password(subject, tenant, password, new_password, keep_family=None)
        return self._login_pair(subject, tenant, new_id(), self._clock() + self._login_max_age)

    async def change_password(self, caller: Principal, current: str, new: str, source: str = "") -> None:
        """The caller's own password; its other logins end (the one making the call stays)."""
        if caller.kind != "user":
            raise PermissionDenied("only users have passwords")
        if caller.credential.startswith("dg:"):
            raise PermissionDenied("a job delegation cannot change a password")
        if not current or not new:
            raise InvalidArgument("current_password and new_password are required")
        check_new_password(new, "new_password")
        if len(current) > MAX_PASSWORD:
            raise Unauthenticated(_WRONG_PASSWORD)
        await self._check_password(source, caller.subject, caller.tenant, current)
        keep = caller.credential.removeprefix("rf:") if caller.credential.startswith("rf:") else None
        await self._set_password(caller.subject, caller.tenant, current, new, keep)

    # -- refresh and logout --------------------------------------------------------------------------
    def _secret_row(
        self,
        value: str,
        field: str,
        what: str,
        parse: Callable[[str], tuple[str, str] | None],
        lookup: Callable[[str], Any],
    ) -> Any:
        """The row of an opaque "<id>.<secret>" credential (a refresh token, a delegation) whose secret matches."""
        if not value:
            raise InvalidArgument(f"{field} is required")
        parsed = parse(value)
        if parsed is None:
            raise Unauthenticated(f"malformed {what}")
        row_id, secret = parsed
        row = lookup(row_id)
        if row is None or not secrets_equal(row.secret_hash, hash_token_secret(secret)):
            raise Unauthenticated(f"unknown {what}")
        return row

    def _refresh_row(self, value: str) -> Any:
        return self._secret_row(
            value, "refresh_token", "refresh token", parse_refresh_secret, self._store.get_refresh_token
        )

    def _end_login(self, row: Any, action: str) -> None:
        now = self._clock()
        self._store.revoke_refresh_family(
            row.family_id, now, self._audit(row.subject, row.tenant, action, row.subject, {"login": row.family_id})
        )
        self.revoked(f"rf:{row.family_id}", now)

    def refresh(self, value: str) -> TokenPair:
        row = self._refresh_row(value)
        now = self._clock()
        if row.revoked:
            raise Unauthenticated("refresh token revoked")
        if (utc(row.expires_at) or now) <= now:
            raise Unauthenticated("refresh token expired")
        # Tokens from before the login lifetime existed: their lifetime counts from their own creation.
        family_end = utc(row.family_expires_at) or (utc(row.created_at) or now) + self._login_max_age
        if family_end <= now:
            raise Unauthenticated("this login has reached its maximum age: log in again")
        principal = self._store.get_principal(row.subject)
        if principal is None or principal.disabled_at is not None:
            raise Unauthenticated("this account is disabled")
        if not self._store.use_refresh_token(row.token_id, now):
            self._end_login(row, "token.reuse_detected")
            raise Unauthenticated("refresh token reused: every token of this login was revoked")
        return self._login_pair(row.subject, row.tenant, row.family_id, family_end)

    def logout(self, value: str) -> None:
        """Ends the login the refresh token belongs to (idempotent)."""
        row = self._refresh_row(value)
        if not row.revoked:
            self._end_login(row, "logout")

    # -- API keys ------------------------------------------------------------------------------------
    async def exchange_api_key(self, value: str, source: str = "") -> TokenPair:
        if not value:
            raise InvalidArgument("api_key is required")
        parsed = parse_api_key_secret(value)
        if parsed is None:
            raise Unauthenticated("malformed API key")
        key_id, secret = parsed
        account = f"apikey:{key_id}"
        self._throttle.admit(source, account)
        row = self._store.get_api_key(key_id)
        if not await asyncio.to_thread(self.hasher.verify, row.secret_hash if row else None, secret) or row is None:
            self._failed(source, account, "", "apikey.failure")
            raise Unauthenticated("unknown API key")
        self._throttle.succeeded(account)
        if row.revoked_at is not None:
            raise Unauthenticated("API key revoked")
        expires_at = utc(row.expires_at)
        if expires_at is not None and expires_at <= self._clock():
            raise Unauthenticated("API key expired")
        principal = self._store.get_principal(row.subject)
        if principal is None:
            raise Unauthenticated("the API key's subject no longer exists")
        if principal.disabled_at is not None:
            raise Unauthenticated("the API key's subject is disabled")
        access, access_expires = self._access_token(row.subject, row.tenant, principal.kind, f"ak:{key_id}")
        return TokenPair(access, access_expires)

    # -- job delegations -----------------------------------------------------------------------------
    def _delegation_info(self, row: Any) -> DelegationInfo:
        return DelegationInfo(
            row.delegation_id,
            row.subject,
            row.tenant,
            row.job_id,
            row.delegate,
            utc(row.created_at) or self._clock(),
            utc(row.expires_at) or self._clock(),
            row.revoked_at is not None,
        )

    def _check_delegate(self, delegate: str, peer_service: str | None) -> None:
        """With mutual TLS, only the delegate service itself, on its own certificate, handles its delegations."""
        if self._delegates_need_certificates and peer_service != delegate:
            raise PermissionDenied(f"only the {delegate} service (on its mesh certificate) may use this delegation")

    def create_delegation(
        self, caller: Principal, tenant: str, job_id: str, delegate: str, ttl_seconds: int, peer_service: str | None
    ) -> tuple[DelegationInfo, str]:
        """A delegation letting service ``delegate`` act for the caller in ``tenant`` for job ``job_id``."""
        if caller.kind == "service":
            raise PermissionDenied("a mesh service acts as itself; delegations are made by users and service accounts")
        if caller.credential.startswith("dg:"):
            raise PermissionDenied("a job delegation cannot make further delegations")
        if not tenant or not job_id or not delegate:
            raise InvalidArgument("tenant, job_id and delegate are required")
        if len(job_id) > _MAX_JOB_ID or CONTROL.search(job_id):
            raise InvalidArgument(f"job_id must be at most {_MAX_JOB_ID} characters without control characters")
        if delegate not in SERVICE_NAMES or delegate == "auth":
            raise InvalidArgument(
                f"delegate must be a mesh service: {', '.join(n for n in SERVICE_NAMES if n != 'auth')}"
            )
        longest = int(self._delegation_ttl.total_seconds())
        if not 0 <= ttl_seconds <= longest:
            raise InvalidArgument(f"ttl_seconds must be between 0 (the longest) and {longest}")
        if self._store.get_tenant(tenant) is None:
            raise NotFound(f"tenant {tenant!r} not found")
        self._check_delegate(delegate, peer_service)
        delegation_id, secret, full = new_delegation_secret()
        now = self._clock()
        expires = now + (timedelta(seconds=ttl_seconds) if ttl_seconds else self._delegation_ttl)
        self._store.create_delegation(
            delegation_id,
            caller.subject,
            tenant,
            job_id,
            delegate,
            hash_token_secret(secret),
            now,
            expires,
            self._audit(
                caller.subject,
                tenant,
                "delegation.create",
                f"delegation:{delegation_id}",
                {"job": job_id, "delegate": delegate, "expires": expires.isoformat()},
            ),
        )
        row = self._store.get_delegation(delegation_id)
        return self._delegation_info(row), full

    def _delegation_row(self, value: str) -> Any:
        return self._secret_row(value, "secret", "delegation", parse_delegation_secret, self._store.get_delegation)

    def exchange_delegation(self, value: str, peer_service: str | None) -> TokenPair:
        """An access token of the delegating subject, bound to the delegation's tenant."""
        row = self._delegation_row(value)
        self._check_delegate(row.delegate, peer_service)
        if row.revoked_at is not None:
            raise Unauthenticated("delegation revoked")
        if (utc(row.expires_at) or self._clock()) <= self._clock():
            raise Unauthenticated("delegation expired")
        principal = self._store.get_principal(row.subject)
        if principal is None:
            raise Unauthenticated("the delegating subject no longer exists")
        if principal.disabled_at is not None:
            raise Unauthenticated("the delegating subject is disabled")
        access, expires = self._access_token(
            row.subject, row.tenant, principal.kind, f"dg:{row.delegation_id}", bound_tenant=row.tenant
        )
        return TokenPair(access, expires)

    def revoke_delegation(self, value: str, peer_service: str | None) -> None:
        """Revokes a delegation (idempotent)."""
        row = self._delegation_row(value)
        self._check_delegate(row.delegate, peer_service)
        if row.revoked_at is None:
            now = self._clock()
            self._store.revoke_delegation(
                row.delegation_id,
                now,
                self._audit(
                    f"service:{row.delegate}",
                    row.tenant,
                    "delegation.revoke",
                    f"delegation:{row.delegation_id}",
                    {"job": row.job_id, "subject": row.subject},
                ),
            )
            self.revoked(f"dg:{row.delegation_id}", now)
