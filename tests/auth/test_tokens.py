"""Tokens: every bad token is UNAUTHENTICATED; API keys, refresh rotation with reuse detection, key rotation."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime, timedelta

import grpc
import jwt
import pytest

from services.auth.core.tokens import new_signing_key, sign_access_token
from services.mesh.errors import Unauthenticated
from services.mesh.security import secured_server
from tests.conftest import RunningAuth
from tests.mesh.echo import PERMISSIONS, EchoClient, Req, registration

PASSWORD = "correct horse battery"


async def _setup(auth: RunningAuth) -> str:
    """Creates tenant acme with developer alice; returns the admin token."""
    admin_token = (await auth.client().login("platform", "admin", auth.admin_password)).access_token
    admin = auth.client(admin_token)
    await admin.create_tenant("acme")
    await admin.create_user("acme", "alice", PASSWORD, ["developer"])
    return admin_token


def _sessions(auth: RunningAuth):  # noqa: ANN202 - test access to the service's domain object
    return auth.server.verifier._sessions  # type: ignore[attr-defined]


async def _whoami(auth: RunningAuth, token: str) -> str:
    return (await auth.client(token).whoami()).subject


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "user:platform/admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


async def test_bad_access_tokens_are_unauthenticated(auth: RunningAuth) -> None:
    await _setup(auth)
    good = (await auth.client().login("acme", "alice", PASSWORD)).access_token
    assert await _whoami(auth, good) == "user:acme/alice"
    core = _sessions(auth)
    now = datetime.now(UTC)
    claims = {
        "sub": "user:acme/alice",
        "tid": "acme",
        "knd": "user",
        "cid": jwt.decode(good, options={"verify_signature": False})["cid"],
    }
    expired, _ = sign_access_token(core._active_key(), claims, now - timedelta(hours=1), timedelta(minutes=15))
    foreign_key = new_signing_key(now)
    unknown_kid, _ = sign_access_token(foreign_key, claims, now, timedelta(minutes=15))
    # A token with a known kid but signed by another key.
    forged_key = new_signing_key(now)
    object.__setattr__(forged_key, "kid", core._active_key().kid)
    wrong_signature, _ = sign_access_token(forged_key, claims, now, timedelta(minutes=15))
    cases = {
        "tampered": _tamper(good),
        "expired": expired,
        "unknown kid": unknown_kid,
        "wrong signature": wrong_signature,
        "malformed": "abc.def",
        "none algorithm": jwt.encode({**claims, "exp": 9999999999}, key=None, algorithm="none"),
        # Every token must name the credential it was issued for (else it could never be revoked).
        "no credential": sign_access_token(
            core._active_key(), {k: v for k, v in claims.items() if k != "cid"}, now, timedelta(minutes=15)
        )[0],
    }
    for label, token in cases.items():
        with pytest.raises(Unauthenticated) as info:
            await _whoami(auth, token)
        assert info.value.message, label


async def test_api_key_exchange_revocation_and_expiry(auth: RunningAuth) -> None:
    await _setup(auth)
    alice_token = (await auth.client().login("acme", "alice", PASSWORD)).access_token
    alice = auth.client(alice_token)
    created = await alice.create_api_key("acme", description="ci")
    assert created.secret.startswith("aidc_") and created.api_key.key_id in created.secret
    listed = await alice.list_api_keys("acme")
    assert [k.key_id for k in listed] == [created.api_key.key_id]
    key_token = (await auth.client().exchange_api_key(created.secret)).access_token
    assert await _whoami(auth, key_token) == "user:acme/alice"

    await alice.revoke_api_key("acme", created.api_key.key_id)
    with pytest.raises(Unauthenticated, match="revoked"):
        await auth.client().exchange_api_key(created.secret)
    with pytest.raises(Unauthenticated, match="revoked"):
        await _whoami(auth, key_token)

    wrong = created.secret[:-4] + "AAAA"
    with pytest.raises(Unauthenticated):
        await auth.client().exchange_api_key(wrong)

    short = await alice.create_api_key("acme", description="short", ttl_seconds=1)
    await asyncio.sleep(1.2)
    with pytest.raises(Unauthenticated, match="expired"):
        await auth.client().exchange_api_key(short.secret)


async def test_refresh_rotation_and_reuse_detection(auth: RunningAuth) -> None:
    await _setup(auth)
    anon = auth.client()
    first = await anon.login("acme", "alice", PASSWORD)
    second = await anon.refresh_token(first.refresh_token)
    assert second.refresh_token != first.refresh_token
    assert await _whoami(auth, second.access_token) == "user:acme/alice"
    with pytest.raises(Unauthenticated, match="reused"):
        await anon.refresh_token(first.refresh_token)
    # Reuse revoked the whole family, including the token handed out legitimately.
    with pytest.raises(Unauthenticated, match="revoked"):
        await anon.refresh_token(second.refresh_token)
    with pytest.raises(Unauthenticated):
        await anon.refresh_token("rt_nonsense.value")


async def test_tokens_of_a_just_rotated_key_verify_at_once_in_auth(auth: RunningAuth) -> None:
    """Auth verifies with its own keys: a token signed with a key rotated a moment ago is accepted by auth at once,
    however recently its verifier last loaded the keys (it refused the unknown kid for up to 2 s before)."""
    admin_token = await _setup(auth)
    for _ in range(2):  # the first round's new kid makes auth's verifier load its keys just before the second's
        kid = await auth.client(admin_token).rotate_signing_key()
        token = (await auth.client().login("acme", "alice", PASSWORD)).access_token
        assert jwt.get_unverified_header(token)["kid"] == kid
        assert await _whoami(auth, token) == "user:acme/alice"


async def test_signing_key_rotation_keeps_old_tokens_valid_everywhere(auth: RunningAuth) -> None:
    admin_token = await _setup(auth)
    echo = secured_server("echo", auth.settings, [registration()], PERMISSIONS, address="127.0.0.1:0")
    port = await echo.start()
    await echo.wait_ready()
    try:
        old = (await auth.client().login("acme", "alice", PASSWORD)).access_token
        new_kid = await auth.client(admin_token).rotate_signing_key()
        new = (await auth.client().login("acme", "alice", PASSWORD)).access_token
        assert jwt.get_unverified_header(new)["kid"] == new_kid != jwt.get_unverified_header(old)["kid"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = EchoClient(channel)
            for token in (old, new):  # the echo service learns the new kid from auth's JWKS on first sight
                reply = await client.unary("WhoAmI")(Req(), metadata=(("authorization", f"Bearer {token}"),))
                assert reply.tenant.name.startswith("user:acme/alice")
        assert await _whoami(auth, old) == "user:acme/alice"
    finally:
        await echo.stop(0)
