"""Who is calling: the Principal, the context variables that carry it, and local verification of access tokens.

Access tokens are JWTs signed by the auth service with an asymmetric key named by ``kid``; every service
verifies them locally against the auth service's published key set (JWKS), so no RPC is spent per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
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
    "Principal",
    "TokenVerifier",
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
    #: Token id (jti), and the API key it was exchanged for, if any.
    token_id: str = ""
    api_key_id: str = ""
    expires_at: float = 0.0


#: The caller of the RPC being served, set by the authentication interceptor.
current_principal: ContextVar[Principal | None] = ContextVar("aidc_current_principal", default=None)


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


KeySetLoader = Callable[[], Awaitable[str]]


class TokenVerifier:
    """Verifies access tokens against a JWKS document, refreshing it when an unknown ``kid`` shows up.

    Verified tokens are cached until they expire, so a repeat caller costs one dictionary lookup.
    """

    def __init__(
        self,
        load_jwks: KeySetLoader,
        *,
        leeway_seconds: float = 5.0,
        refresh_interval_seconds: float = 2.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._load_jwks = load_jwks
        self._leeway = leeway_seconds
        self._refresh_interval = refresh_interval_seconds
        self._cache_size = cache_size
        self._clock = clock
        self._keys: dict[str, Any] = {}
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()
        self._cache: OrderedDict[str, Principal] = OrderedDict()

    def forget(self, token: str) -> None:
        """Drops a token from the verified-token cache (e.g. after its API key was revoked)."""
        self._cache.pop(token, None)

    async def verify(self, token: str) -> Principal:
        """The principal a token names; Unauthenticated for malformed, tampered, expired or unknown-key tokens."""
        cached = self._cache.get(token)
        now = self._clock()
        if cached is not None:
            if cached.expires_at + self._leeway > now:
                return cached
            self._cache.pop(token, None)
            raise Unauthenticated("access token expired")
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
                options={"require": ["exp", "iat", "sub", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("access token expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid access token: {exc}") from None
        principal = Principal(
            subject=str(claims["sub"]),
            tenant=str(claims.get("tid", "")),
            kind=str(claims.get("knd", "user")),
            token=token,
            token_id=str(claims["jti"]),
            api_key_id=str(claims.get("akid", "")),
            expires_at=float(claims["exp"]),
        )
        self._cache[token] = principal
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal

    async def _key(self, kid: str) -> Any:
        key = self._keys.get(kid)
        if key is not None:
            return key
        async with self._lock:
            key = self._keys.get(kid)
            if key is None and self._clock() - self._loaded_at >= self._refresh_interval:
                await self._refresh()
                key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated("access token signed by an unknown key")
        return key

    async def _refresh(self) -> None:
        try:
            document = await self._load_jwks()
        except Unavailable:
            raise
        except Exception as exc:  # the auth service is down or answered garbage
            log.warning("could not load the token verification keys: %s", exc)
            raise Unavailable("token verification keys are unavailable") from None
        self._loaded_at = self._clock()
        keys: dict[str, Any] = {}
        for entry in json.loads(document).get("keys", []):
            try:
                keys[entry["kid"]] = jwt.PyJWK.from_dict(entry).key
            except (KeyError, jwt.PyJWTError) as exc:
                log.warning("skipping a bad JWKS entry: %s", exc)
        self._keys = keys
