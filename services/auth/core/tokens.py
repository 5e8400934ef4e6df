"""Signing keys and tokens: Ed25519 JWTs with ``kid``, the published key set, key rotation, and the
opaque secrets (API keys, refresh tokens, job delegations) with their hashes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.mesh.identity import TOKEN_AUDIENCE, TOKEN_ISSUER
from services.mesh.sealing import InvalidTag, WrongMasterKey, seal, unseal

__all__ = [
    "SigningKey",
    "KeyWrapper",
    "new_signing_key",
    "jwks_document",
    "sign_access_token",
    "SlowHasher",
    "new_api_key_secret",
    "parse_api_key_secret",
    "new_refresh_secret",
    "parse_refresh_secret",
    "new_delegation_secret",
    "parse_delegation_secret",
    "hash_token_secret",
    "new_id",
]


def new_id(prefix: str = "") -> str:
    """A random, URL-safe identifier."""
    return prefix + uuid.uuid4().hex


@dataclass(frozen=True)
class SigningKey:
    """One token-signing key pair."""

    kid: str
    private_key: Ed25519PrivateKey
    public_jwk: dict[str, Any]
    created_at: datetime
    retired_at: datetime | None


class KeyWrapper:
    """Encrypts signing keys at rest (AES-256-GCM) under the auth service's master key."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise ValueError("the auth master key must be 32 bytes")
        self._master = master_key

    def wrap(self, kid: str, key: Ed25519PrivateKey) -> bytes:
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return seal(self._master, raw, kid.encode())

    def unwrap(self, kid: str, blob: bytes) -> Ed25519PrivateKey:
        try:
            return Ed25519PrivateKey.from_private_bytes(unseal(self._master, blob, kid.encode()))
        except InvalidTag:
            raise WrongMasterKey(
                f"signing key {kid} does not open with this master key: AIDC_AUTH_MASTER_KEY (or "
                "<data_dir>/auth/master.key) is not the key the auth database was sealed with"
            ) from None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_signing_key(now: datetime) -> SigningKey:
    """A fresh Ed25519 key with its public JWK."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    kid = now.strftime("%Y%m%d%H%M%S-") + secrets.token_hex(4)
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64url(public), "kid": kid, "alg": "EdDSA", "use": "sig"}
    return SigningKey(kid=kid, private_key=key, public_jwk=jwk, created_at=now, retired_at=None)


def jwks_document(keys: list[SigningKey], now: datetime, keep_retired_for: timedelta) -> str:
    """The JWKS: the active key, and retired keys for ``keep_retired_for`` after their retirement (while tokens they
    signed may still be unexpired); after that a retired key is gone, and verifiers refuse what it signs."""
    published = [k.public_jwk for k in keys if k.retired_at is None or k.retired_at + keep_retired_for > now]
    return json.dumps({"keys": published}, sort_keys=True)


def sign_access_token(key: SigningKey, claims: dict[str, Any], now: datetime, ttl: timedelta) -> tuple[str, datetime]:
    """A signed access token and its expiry."""
    expires = now + ttl
    payload = {
        "iss": TOKEN_ISSUER,
        "aud": TOKEN_AUDIENCE,
        # To the millisecond, rounded down (JWT times may have fractions): revocations refuse tokens issued before
        # an instant, and whole seconds would refuse tokens issued just after it too (or spare ones issued before).
        "iat": math.floor(now.timestamp() * 1000) / 1000,
        "nbf": int(now.timestamp()),
        "exp": int(expires.timestamp()),
        "jti": new_id(),
        **claims,
    }
    token = jwt.encode(payload, key.private_key, algorithm="EdDSA", headers={"kid": key.kid})
    return token, expires


class SlowHasher:
    """Argon2id for passwords and API-key secrets (slow on purpose)."""

    def __init__(self, time_cost: int = 2, memory_cost_kib: int = 19 * 1024) -> None:
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_cost_kib, parallelism=1)
        # Spent on unknown users too, so that timing does not reveal which names exist.
        self._dummy = self._hasher.hash(secrets.token_hex(16))

    def hash(self, secret: str) -> str:
        return self._hasher.hash(secret)

    def verify(self, stored_hash: str | None, secret: str) -> bool:
        try:
            return bool(self._hasher.verify(stored_hash or self._dummy, secret)) and stored_hash is not None
        except (VerificationError, InvalidHashError):
            return False


_API_KEY_PREFIX = "aidc_"


def new_api_key_secret() -> tuple[str, str, str]:
    """(key_id, secret part, full key string to hand to the user once)."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{_API_KEY_PREFIX}{key_id}_{secret}"


def parse_api_key_secret(value: str) -> tuple[str, str] | None:
    """(key_id, secret) of an API key string, or None if it is not shaped like one."""
    if not value.startswith(_API_KEY_PREFIX):
        return None
    key_id, sep, secret = value[len(_API_KEY_PREFIX) :].partition("_")
    if not sep or len(key_id) != 16 or not secret:
        return None
    return key_id, secret


def _new_opaque_secret(prefix: str) -> tuple[str, str, str]:
    token_id = secrets.token_hex(12)
    secret = secrets.token_urlsafe(32)
    return token_id, secret, f"{prefix}{token_id}.{secret}"


def _parse_opaque_secret(prefix: str, value: str) -> tuple[str, str] | None:
    if not value.startswith(prefix):
        return None
    token_id, sep, secret = value[len(prefix) :].partition(".")
    if not sep or not token_id or not secret:
        return None
    return token_id, secret


def new_refresh_secret() -> tuple[str, str, str]:
    """(token_id, secret, full refresh token string)."""
    return _new_opaque_secret("rt_")


def parse_refresh_secret(value: str) -> tuple[str, str] | None:
    return _parse_opaque_secret("rt_", value)


def new_delegation_secret() -> tuple[str, str, str]:
    """(delegation_id, secret, full delegation secret string)."""
    return _new_opaque_secret("dg_")


def parse_delegation_secret(value: str) -> tuple[str, str] | None:
    return _parse_opaque_secret("dg_", value)


def hash_token_secret(secret: str) -> str:
    """SHA-256 for high-entropy random secrets (refresh tokens, delegations); slow hashing adds nothing there."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secrets_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a, b)


def utcnow() -> datetime:
    return datetime.now(UTC)
