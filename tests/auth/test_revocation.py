"""Ending credentials, proved on auth itself and on another real service of the mesh (the echo service, with a long
decision cache so that only the revocation list can refuse): a revoked API key, a retired signing key, a disabled
user, a logout, a password change, the absolute lifetime of a login, and the first-start admin's password. A revoked
API key is also proved on the real storage service here, and on the real inference gateway in
tests/serving/test_gateway.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import jwt
import pytest

from services.auth.client import AuthClient
from services.auth.config import AuthSettings
from services.auth.core.tokens import KeyWrapper, SigningKey, sign_access_token
from services.auth.store import AuthStore
from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
from services.mesh.db import open_database
from services.mesh.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unauthenticated
from services.mesh.identity import TokenVerifier
from services.mesh.security import AuthDecisions, secured_server
from services.storage.config import StorageSettings
from tests.conftest import ADMIN_PASSWORD, RunningAuth, start_auth
from tests.mesh.echo import PERMISSIONS, EchoClient, Req, registration
from tests.storage.conftest import seaweed, start_storage, storage_env, user_tokens  # noqa: F401 - fixture
from tests.storage.seaweed import SeaweedFS

PASSWORD = "correct horse battery"
#: How often the echo service refetches auth's keys and revocations in these tests.
REFRESH_SECONDS = 0.5
#: How long the echo service trusts its last keys and revocations while auth does not answer, in these tests.
MAX_STALE_SECONDS = 3.0

#: Calls the echo service's ReadDatasets in acme with a token: "ok" or the status code's name.
Echo = Callable[[str], Awaitable[str]]


@pytest.fixture
async def echo(auth: RunningAuth) -> AsyncIterator[Echo]:
    """Another service of the mesh, verifying with auth's keys and revocations; its decisions are cached for a
    minute, so a refusal within the test can only come from the revocation list (or the keys)."""
    settings = replace(
        auth.settings,
        decision_cache_seconds=60.0,
        revocation_refresh_seconds=REFRESH_SECONDS,
        revocation_max_stale_seconds=MAX_STALE_SECONDS,
    )
    server = secured_server("echo", settings, [registration()], PERMISSIONS, address="127.0.0.1:0")
    port = await server.start()
    await server.wait_ready()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    read = EchoClient(channel).unary("ReadDatasets")

    async def call(token: str) -> str:
        try:
            await read(Req(tenant="acme"), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code().name
        return "ok"

    yield call
    await channel.close()
    await server.stop(0)


async def refused_within(call: Callable[[], Awaitable[str]], seconds: float) -> tuple[str, float]:
    """Polls until ``call`` stops answering "ok"; (its answer, seconds it took). Fails after ``seconds``."""
    began = time.monotonic()
    while True:
        answer = await call()
        waited = time.monotonic() - began
        if answer != "ok":
            return answer, waited
        assert waited < seconds, f"still accepted after {waited:.1f}s"
        await asyncio.sleep(0.1)


async def test_storage_refuses_a_revoked_api_keys_token_within_the_refresh_whatever_its_cache_holds(
    auth: RunningAuth, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The real storage service, its decision cache holding "allowed" for a minute: only its copy of the revocation
    list, refetched every REFRESH_SECONDS (AIDC_REVOCATION_REFRESH_SECONDS), can refuse the key's token in time."""
    s3: SeaweedFS = request.getfixturevalue("seaweed")  # the session's (tests/storage/conftest.py)
    tokens = await user_tokens(auth)
    env = storage_env(
        tmp_path / "storage",
        auth.address,
        s3,
        AIDC_DECISION_CACHE_SECONDS="60",
        AIDC_REVOCATION_REFRESH_SECONDS=str(REFRESH_SECONDS),
    )
    storage = await start_storage(StorageSettings.from_env(env), tokens)
    try:
        dev = auth.client(tokens["acme/dev"])
        key = await dev.create_api_key("acme", description="ci")
        storage.tokens["acme/ci"] = (await auth.client().exchange_api_key(key.secret)).access_token
        await storage.client("acme/ci").create_dataset("acme", "revocation")

        async def read(user: str) -> str:
            try:
                await storage.client(user).list_all("acme")
            except Unauthenticated:
                return "UNAUTHENTICATED"
            return "ok"

        assert await read("acme/ci") == await read("acme/dev") == "ok"  # dev's decisions are cached now
        await dev.revoke_api_key("acme", key.api_key.key_id)
        answer, _ = await refused_within(lambda: read("acme/ci"), REFRESH_SECONDS + 5)
        assert answer == "UNAUTHENTICATED"
        assert await read("acme/dev") == "ok"  # the key's subject, logged in, is untouched
    finally:
        await storage.close()
        await storage.server.stop(0)


async def _admin(auth: RunningAuth) -> AuthClient:
    return auth.client((await auth.client().login("platform", "admin", auth.admin_password)).access_token)


async def _acme_with_alice(auth: RunningAuth) -> AuthClient:
    admin = await _admin(auth)
    await admin.create_tenant("acme")
    await admin.create_user("acme", "alice", PASSWORD, ["developer"])
    return admin


async def test_a_revoked_api_keys_token_is_refused_elsewhere_while_its_subject_stays_logged_in(
    auth: RunningAuth, echo: Echo
) -> None:
    await _acme_with_alice(auth)
    session = (await auth.client().login("acme", "alice", PASSWORD)).access_token
    alice = auth.client(session)
    key = await alice.create_api_key("acme", description="ci")
    key_token = (await auth.client().exchange_api_key(key.secret)).access_token
    assert await echo(session) == await echo(key_token) == "ok"  # alice's decision is now cached for a minute

    await alice.revoke_api_key("acme", key.api_key.key_id)
    answer, waited = await refused_within(lambda: echo(key_token), REFRESH_SECONDS + 5)
    assert answer == "UNAUTHENTICATED"
    assert await echo(session) == "ok"  # the same subject's other login is untouched
    with pytest.raises(Unauthenticated, match="revoked"):
        await auth.client(key_token).whoami()  # auth itself refuses at once


@pytest.mark.auth_env(AIDC_AUTH_ACCESS_TOKEN_TTL_SECONDS="4")
async def test_a_retired_signing_key_is_refused_everywhere_once_its_tokens_have_expired(
    auth: RunningAuth, echo: Echo
) -> None:
    await _acme_with_alice(auth)
    login = (await auth.client().login("acme", "alice", PASSWORD)).access_token
    old_kid = jwt.get_unverified_header(login)["kid"]
    db = open_database(auth.settings.database_url_for("auth"))
    try:
        [row] = [r for r in AuthStore(db).signing_keys() if r.kid == old_kid]
    finally:
        db.dispose()
    # Someone who stole the key keeps minting long-lived tokens with it after the operator rotated it away.
    private = KeyWrapper(auth.settings.master_key()).unwrap(old_kid, row.private_key)
    stolen = SigningKey(old_kid, private, {}, datetime.now(UTC), None)
    claims = jwt.decode(login, options={"verify_signature": False})
    claims = {k: claims[k] for k in ("sub", "tid", "knd", "cid") if k in claims}

    def forged() -> str:
        return sign_access_token(stolen, claims, datetime.now(UTC), timedelta(hours=1))[0]

    await (await _admin(auth)).rotate_signing_key()
    rotated = time.monotonic()
    assert await echo(login) == "ok"  # tokens the key signed before its retirement keep working until they expire
    window = 4 + 10  # the access-token lifetime plus twice the verifiers' leeway: then the key leaves the JWKS
    answer, _ = await refused_within(lambda: echo(forged()), window + REFRESH_SECONDS + 10)
    assert answer == "UNAUTHENTICATED" and time.monotonic() - rotated >= window - 1
    with pytest.raises(Unauthenticated, match="unknown key|retired key"):
        await auth.client(forged()).whoami()
    fresh = (await auth.client().login("acme", "alice", PASSWORD)).access_token
    assert jwt.get_unverified_header(fresh)["kid"] != old_kid and await echo(fresh) == "ok"


async def test_a_disabled_user_is_refused_everywhere_until_enabled(auth: RunningAuth, echo: Echo) -> None:
    admin = await _acme_with_alice(auth)
    await admin.create_user("acme", "boss", PASSWORD, ["tenant-admin"])
    pair = await auth.client().login("acme", "alice", PASSWORD)
    alice = auth.client(pair.access_token)
    key = await alice.create_api_key("acme", description="ci")
    key_token = (await auth.client().exchange_api_key(key.secret)).access_token
    assert await echo(pair.access_token) == await echo(key_token) == "ok"

    boss = auth.client((await auth.client().login("acme", "boss", PASSWORD)).access_token)
    user = await boss.disable_user("acme", "user:acme/alice")
    assert user.disabled
    for token in (pair.access_token, key_token):
        answer, _ = await refused_within(lambda token=token: echo(token), REFRESH_SECONDS + 5)  # type: ignore[misc]
        assert answer == "UNAUTHENTICATED"
        with pytest.raises(Unauthenticated):
            await auth.client(token).whoami()
    with pytest.raises(Unauthenticated, match="disabled"):
        await auth.client().login("acme", "alice", PASSWORD)
    with pytest.raises(Unauthenticated, match="disabled"):
        await auth.client().exchange_api_key(key.secret)
    with pytest.raises(Unauthenticated, match="disabled"):
        await auth.client().refresh_token(pair.refresh_token)
    assert {u.subject: u.disabled for u in await _users(admin)}["user:acme/alice"]

    await boss.enable_user("acme", "user:acme/alice")
    fresh = (await auth.client().login("acme", "alice", PASSWORD)).access_token
    assert await echo(fresh) == "ok"
    assert (await auth.client().exchange_api_key(key.secret)).access_token  # the key works again
    assert await echo(key_token) == "UNAUTHENTICATED"  # what was issued before the disable stays refused
    actions = [e.action for e in await admin.list_audit_events("acme", 100)]
    assert "user.disable" in actions and "user.enable" in actions


async def _users(admin: AuthClient) -> list[pb.User]:
    return list((await admin._unary(admin.stub.ListUsers, pb.ListUsersRequest(tenant="acme"))).users)


async def test_disabling_needs_the_right_to_grant_every_role_of_the_subject(auth: RunningAuth) -> None:
    admin = await _acme_with_alice(auth)
    await admin.create_user("acme", "boss", PASSWORD, ["tenant-admin"])
    await admin.create_user("acme", "ops", PASSWORD, ["developer"])
    await admin.assign_role("user:acme/ops", "platform-admin", "platform")
    boss = auth.client((await auth.client().login("acme", "boss", PASSWORD)).access_token)
    with pytest.raises(PermissionDenied, match="platform-admin"):
        await boss.disable_user("acme", "user:acme/ops")
    with pytest.raises(FailedPrecondition, match="yourself"):
        await boss.disable_user("acme", "user:acme/boss")
    alice = auth.client((await auth.client().login("acme", "alice", PASSWORD)).access_token)
    with pytest.raises(PermissionDenied):
        await alice.disable_user("acme", "user:acme/boss")
    assert not {u.subject: u.disabled for u in await _users(admin)}["user:acme/ops"]
    await admin.disable_user("acme", "user:acme/ops")  # the platform admin may


async def test_logout_ends_the_login_and_its_access_tokens(auth: RunningAuth, echo: Echo) -> None:
    await _acme_with_alice(auth)
    first = await auth.client().login("acme", "alice", PASSWORD)
    other = await auth.client().login("acme", "alice", PASSWORD)
    refreshed = await auth.client().refresh_token(first.refresh_token)
    assert await echo(refreshed.access_token) == "ok"
    await auth.client().logout(refreshed.refresh_token)
    for token in (first.access_token, refreshed.access_token):
        answer, _ = await refused_within(lambda token=token: echo(token), REFRESH_SECONDS + 5)  # type: ignore[misc]
        assert answer == "UNAUTHENTICATED"
    with pytest.raises(Unauthenticated, match="revoked"):
        await auth.client().refresh_token(refreshed.refresh_token)
    await auth.client().logout(refreshed.refresh_token)  # idempotent
    assert await echo(other.access_token) == "ok"  # another login of the same user goes on
    assert (await auth.client().refresh_token(other.refresh_token)).access_token
    with pytest.raises(Unauthenticated, match="malformed"):
        await auth.client().logout("not a refresh token")


async def test_a_password_change_ends_the_other_logins(auth: RunningAuth, echo: Echo) -> None:
    await _acme_with_alice(auth)
    here = await auth.client().login("acme", "alice", PASSWORD)
    elsewhere = await auth.client().login("acme", "alice", PASSWORD)
    alice = auth.client(here.access_token)
    with pytest.raises(Unauthenticated):
        await alice.change_password("wrong current password", "a brand new passphrase")
    with pytest.raises(InvalidArgument, match="differ"):
        await alice.change_password(PASSWORD, PASSWORD)
    with pytest.raises(InvalidArgument, match="12"):
        await alice.change_password(PASSWORD, "short")
    await alice.change_password(PASSWORD, "a brand new passphrase")
    answer, _ = await refused_within(lambda: echo(elsewhere.access_token), REFRESH_SECONDS + 5)
    assert answer == "UNAUTHENTICATED"
    with pytest.raises(Unauthenticated):
        await auth.client().refresh_token(elsewhere.refresh_token)
    assert await echo(here.access_token) == "ok"  # the login that changed it goes on
    assert (await auth.client().refresh_token(here.refresh_token)).access_token
    with pytest.raises(Unauthenticated):
        await auth.client().login("acme", "alice", PASSWORD)
    assert (await auth.client().login("acme", "alice", "a brand new passphrase")).access_token


@pytest.mark.auth_env(AIDC_AUTH_LOGIN_MAX_AGE_SECONDS="6")
async def test_a_login_ends_at_its_absolute_lifetime_however_often_it_is_refreshed(auth: RunningAuth) -> None:
    await _acme_with_alice(auth)
    pair = await auth.client().login("acme", "alice", PASSWORD)
    began = time.monotonic()
    assert pair.refresh_token_expire_time.ToDatetime(UTC) <= datetime.now(UTC) + timedelta(seconds=7)
    # Refreshed for the first half of its life (half of it left as margin for a slow machine), then past its end.
    while time.monotonic() - began < 3:
        pair = await auth.client().refresh_token(pair.refresh_token)
        await asyncio.sleep(0.5)
    await asyncio.sleep(max(0.0, 6.5 - (time.monotonic() - began)))
    with pytest.raises(Unauthenticated, match="maximum age|expired"):
        await auth.client().refresh_token(pair.refresh_token)
    assert (await auth.client().login("acme", "alice", PASSWORD)).refresh_token  # a new login starts a new one


async def test_the_first_start_admin_password_works_once_to_set_a_new_one(settings: AuthSettings) -> None:
    running = await start_auth(settings, first_login=False)
    try:
        one_time = running.admin_password
        with pytest.raises(FailedPrecondition, match="expired"):
            await running.client().login("platform", "admin", one_time)
        with pytest.raises(InvalidArgument, match="new_password"):
            await running.client().login("platform", "admin", one_time, new_password="short")
        pair = await running.client().login("platform", "admin", one_time, new_password=ADMIN_PASSWORD)
        assert (await running.client(pair.access_token).whoami()).subject == "user:platform/admin"
        with pytest.raises(Unauthenticated):
            await running.client().login("platform", "admin", one_time, new_password="another passphrase!")
        assert (await running.client().login("platform", "admin", ADMIN_PASSWORD)).access_token
    finally:
        await running.server.stop(0)


async def test_a_service_trusts_its_last_revocation_list_only_for_a_bounded_time_while_auth_is_down(
    auth: RunningAuth, echo: Echo
) -> None:
    await _acme_with_alice(auth)
    token = (await auth.client().login("acme", "alice", PASSWORD)).access_token
    assert await echo(token) == "ok"
    await auth.server.stop(0)
    stopped = time.monotonic()
    # A short auth outage (a restart) is invisible: the last keys and list are trusted for MAX_STALE_SECONDS ...
    assert await echo(token) == "ok"
    answer, _ = await refused_within(lambda: echo(token), MAX_STALE_SECONDS + 10)
    # ... and never longer: a revocation made just before auth went down must not be missed.
    assert answer == "UNAVAILABLE"
    assert time.monotonic() - stopped >= MAX_STALE_SECONDS - REFRESH_SECONDS


async def test_no_request_waits_for_auth_while_the_keys_are_fresh_enough(auth: RunningAuth) -> None:
    """The periodic refetch runs beside requests: a slow auth delays no token check until the keys are older than
    the staleness bound, and then the checks wait for it."""
    await _acme_with_alice(auth)
    token = (await auth.client().login("acme", "alice", PASSWORD)).access_token
    decisions = AuthDecisions(grpc.aio.insecure_channel(auth.address))
    auth_answers = asyncio.Event()
    auth_answers.set()
    fetches = 0

    async def slow_jwks() -> str:
        nonlocal fetches
        fetches += 1
        await auth_answers.wait()
        return await decisions.jwks()

    # The verifier's clock of fetches is a fake moved by hand: a loaded machine's slowness cannot carry the checks
    # past the staleness bound unseen.
    now = [1000.0]
    verifier = TokenVerifier(
        slow_jwks, decisions.revocations, refresh_seconds=0.2, max_stale_seconds=2.0, monotonic=lambda: now[0]
    )
    try:
        assert (await verifier.verify(token)).subject == "user:acme/alice"
        auth_answers.clear()  # auth stops answering, for good until set again
        now[0] += 0.3  # past the refresh interval, within the staleness bound
        for _ in range(20):  # a check that waited for auth would never end
            assert (await asyncio.wait_for(verifier.verify(token), 30)).subject == "user:acme/alice"
        assert fetches == 2  # one background refetch, started by the first request past the interval
        now[0] += 2.0  # past the staleness bound: requests now wait for the refetch
        waiting = asyncio.create_task(verifier.verify(token))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        auth_answers.set()
        assert (await asyncio.wait_for(waiting, 5)).subject == "user:acme/alice"
    finally:
        auth_answers.set()
        await decisions.close()
