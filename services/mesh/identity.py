"""Who is calling: the Principal, the context variables that carry it, and local verification of access tokens.

Access tokens are JWTs signed by the auth service with an asymmetric key named by ``kid``; every service
verifies them locally against the auth service's published key set (JWKS), so no RPC is spent per request. Every
token names the credential it was issued for (a login, an API key, a job delegation); auth publishes the
credentials (and subjects) whose tokens it revoked, and every verifier refetches both the keys and that list on a
schedule, so a retired key or a revoked credential stops working everywhere within that period.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import jwt

from services.mesh.errors import Unauthenticated, Unavailable

__all__ = [
    "PLATFORM_TENANT",
    "TOKEN_ISSUER",
    "TOKEN_AUDIENCE",
    "TOKEN_LEEWAY_SECONDS",
    "Principal",
    "TokenVerifier",
    "revocation_of",
    "principal_of",
    "outside_binding",
    "current_peer_service",
    "current_principal",
    "require_principal",
    "as_service",
    "tenant_or_own",
    "bearer_token",
]

log = logging.getLogger(__name__)

#: The domain of platform-wide roles and of mesh services.
PLATFORM_TENANT = "platform"
TOKEN_ISSUER = "aidc-auth"
TOKEN_AUDIENCE = "aidc"
#: Clock skew tolerated on a token's times (exp, nbf).
TOKEN_LEEWAY_SECONDS = 5.0


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    #: "user:<tenant>/<name>", "sa:<tenant>/<name>" or "service:<name>".
    subject: str
    #: Home tenant of the subject ("platform" for operators and mesh services).
    tenant: str
    #: "user", "service_account" or "service".
    kind: str
    #: The bearer token it presented (forwarded on internal calls so downstream checks apply to it).
    token: str = ""
    #: Token id (jti).
    token_id: str = ""
    #: The credential the token was issued for: "rf:<login id>" (a password login and its refreshes),
    #: "ak:<key id>" (an API key) or "dg:<delegation id>" (a job delegation); empty for mesh services.
    credential: str = ""
    #: The only tenant the token may act in (job delegations); empty: wherever the subject's roles reach.
    bound_tenant: str = ""
    #: When the token was issued and when it expires (seconds since the epoch), and the key that signed it.
    issued_at: float = 0.0
    expires_at: float = 0.0
    key_id: str = ""


def outside_binding(principal: Principal, tenant: str) -> bool:
    """True when ``principal`` holds a tenant-bound token (a job delegation) and ``tenant`` is another tenant."""
    return bool(principal.bound_tenant) and tenant != principal.bound_tenant


def revocation_of(principal: Principal, revoked: Mapping[str, float]) -> str | None:
    """Why ``principal``'s token is refused under ``revoked`` (credential or subject -> tokens issued before this
    time are refused), or None when it is not."""
    for name, what in (
        (principal.credential, "the credential behind this token was revoked"),
        (principal.subject, "every token of this account was revoked (disabled?)"),
    ):
        cutoff = revoked.get(name) if name else None
        if cutoff is not None and principal.issued_at < cutoff:
            return what
    return None


#: The caller of the RPC being served, set by the authentication interceptor.
current_principal: ContextVar[Principal | None] = ContextVar("aidc_current_principal", default=None)
#: The mesh service whose verified client certificate the connection of the RPC being served presents (even when
#: the call also carries an end user's token), set by the authentication interceptor.
current_peer_service: ContextVar[str | None] = ContextVar("aidc_current_peer_service", default=None)


def tenant_or_own(request_tenant: str) -> str:
    """The tenant a request names, or the caller's own when it names none."""
    return request_tenant or require_principal().tenant


@contextmanager
def as_service() -> Iterator[None]:
    """Calls made inside go out as this service itself (its mTLS identity), not with the token of the end user
    whose request is being served: metering, budget checks and background work are the platform's business."""
    token = current_principal.set(None)
    try:
        yield
    finally:
        current_principal.reset(token)


def require_principal() -> Principal:
    """The authenticated caller of the current RPC; Unauthenticated when there is none."""
    principal = current_principal.get()
    if principal is None:
        raise Unauthenticated("this call requires credentials")
    return principal


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry; None when absent."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
            return token.strip()
    return None


def principal_of(token: str, claims: Mapping[str, Any], key_id: str) -> Principal:
    """The principal an access token's claims name (the claims of a verified token, or of one just received from
    auth itself)."""
    return Principal(
        subject=str(claims["sub"]),
        tenant=str(claims.get("tid", "")),
        kind=str(claims.get("knd", "user")),
        token=token,
        token_id=str(claims["jti"]),
        credential=str(claims["cid"]),
        bound_tenant=str(claims.get("btn", "")),
        issued_at=float(claims["iat"]),
        expires_at=float(claims["exp"]),
        key_id=key_id,
    )


KeySetLoader = Callable[[], Awaitable[str]]
#: Loads the revocation list: credential or subject -> tokens issued before this time (epoch seconds) are refused.
RevocationLoader = Callable[[], Awaitable[Mapping[str, float]]]


_RETRY_AFTER_FAILURE_SECONDS = 1.0


async def _nothing_revoked() -> Mapping[str, float]:
    return {}


class TokenVerifier:
    """Verifies access tokens against auth's key set (JWKS) and revocation list.

    Both are refetched in the background once they are older than ``refresh_seconds`` (the request that notices
    goes on with the current ones, so no request waits for auth on the hot path), and the keys at once when an
    unknown ``kid`` shows up (at most every ``unknown_kid_interval_seconds``). Once they are older than
    ``max_stale_seconds`` (auth has not answered for that long) requests wait for a refetch and fail UNAVAILABLE
    when auth does not answer: a verifier never trusts a list older than that. A key that left the JWKS, or a
    revoked credential, is therefore refused about ``refresh_seconds`` after auth dropped it while auth answers,
    and at most ``max_stale_seconds`` after in any case; an auth restart shorter than that is invisible to callers.
    Verified tokens are cached until they expire, and every hit is checked again against the current keys and list.
    """

    def __init__(
        self,
        load_jwks: KeySetLoader,
        load_revocations: RevocationLoader = _nothing_revoked,
        *,
        refresh_seconds: float = 5.0,
        max_stale_seconds: float = 30.0,
        leeway_seconds: float = TOKEN_LEEWAY_SECONDS,
        unknown_kid_interval_seconds: float = 2.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load_jwks = load_jwks
        self._load_revocations = load_revocations
        self._refresh_seconds = refresh_seconds
        self._max_stale_seconds = max(max_stale_seconds, refresh_seconds)
        self._background: asyncio.Task[None] | None = None
        self._leeway = leeway_seconds
        self._unknown_kid_interval = unknown_kid_interval_seconds
        self._cache_size = cache_size
        self._clock = clock  # wall clock: token times
        self._monotonic = monotonic  # when the keys and revocations were fetched
        self._keys: dict[str, Any] = {}
        self._revoked: Mapping[str, float] = {}
        self._loaded_at = float("-inf")
        self._failed_at = float("-inf")
        self._lock = asyncio.Lock()
        self._cache: OrderedDict[str, Principal] = OrderedDict()

    def forget(self, token: str) -> None:
        """Drops a token from the verified-token cache."""
        self._cache.pop(token, None)

    async def verify(self, token: str) -> Principal:
        """The principal a token names; Unauthenticated for malformed, tampered, expired, revoked or unknown-key
        tokens; Unavailable when the keys and the revocation list are stale and auth does not answer."""
        age = self._monotonic() - self._loaded_at
        if age >= self._max_stale_seconds:
            await self._refresh_when_stale()
        elif (
            age >= self._refresh_seconds
            and self._background is None
            and self._monotonic() - self._failed_at >= _RETRY_AFTER_FAILURE_SECONDS
        ):
            self._background = asyncio.create_task(self._refresh_in_background())
        principal = self._cache.get(token)
        if principal is None:
            principal = await self._decode(token)
            self._cache[token] = principal
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if principal.expires_at + self._leeway <= self._clock():
            self._cache.pop(token, None)
            raise Unauthenticated("access token expired")
        if principal.key_id not in self._keys:
            self._cache.pop(token, None)
            raise Unauthenticated("access token signed by a retired key")
        reason = revocation_of(principal, self._revoked)
        if reason is not None:
            raise Unauthenticated(reason)
        return principal

    async def _decode(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed access token") from None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("access token has no key id")
        key = await self._key(kid)
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=["EdDSA"],
                audience=TOKEN_AUDIENCE,
                issuer=TOKEN_ISSUER,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "sub", "jti", "cid"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("access token expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid access token: {exc}") from None
        return principal_of(token, claims, kid)

    async def _key(self, kid: str) -> Any:
        key = self._keys.get(kid)
        if key is not None:
            return key
        async with self._lock:
            key = self._keys.get(kid)
            if key is None and self._monotonic() - self._loaded_at >= self._unknown_kid_interval:
                await self._refresh()
                key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated("access token signed by an unknown key")
        return key

    async def _refresh_in_background(self) -> None:
        try:
            async with self._lock:
                if self._monotonic() - self._loaded_at >= self._refresh_seconds:
                    await self._refresh()
        except Unavailable:
            self._failed_at = self._monotonic()  # the next request past the refresh interval tries again
        finally:
            self._background = None

    async def _refresh_when_stale(self) -> None:
        async with self._lock:  # concurrent requests share one refetch
            if self._monotonic() - self._loaded_at < self._max_stale_seconds:
                return
            if self._monotonic() - self._failed_at < _RETRY_AFTER_FAILURE_SECONDS:
                # Requests queued behind a refetch that just failed fail at once rather than each waiting for auth.
                raise Unavailable("token verification keys are unavailable")
            try:
                await self._refresh()
            except Unavailable:
                self._failed_at = self._monotonic()
                raise

    async def _refresh(self) -> None:
        try:
            document = await self._load_jwks()
            revoked = await self._load_revocations()
        except Unavailable:
            raise
        except Exception as exc:  # the auth service is down or answered garbage
            log.warning("could not load the token verification keys and revocations: %s", exc)
            raise Unavailable("token verification keys are unavailable") from None
        keys: dict[str, Any] = {}
        for entry in json.loads(document).get("keys", []):
            try:
                keys[entry["kid"]] = jwt.PyJWK.from_dict(entry).key
            except (KeyError, jwt.PyJWTError) as exc:
                log.warning("skipping a bad JWKS entry: %s", exc)
        self._keys = keys
        self._revoked = dict(revoked)
        self._loaded_at = self._monotonic()
