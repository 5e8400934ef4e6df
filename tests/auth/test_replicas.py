"""Two auth replicas (OS processes) on one PostgreSQL database behave as one: started at once on an empty database
they create one platform admin; a role revoked through one is refused by the other within AIDC_AUTH_SYNC_SECONDS;
a signing key rotated through one signs tokens the other accepts, and the other signs with it too."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from services.auth.client import AuthClient
from services.mesh.channels import create_channel
from services.mesh.config import MeshSettings, load_settings
from tests.conftest import ADMIN_PASSWORD, _with_token
from tests.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures
from tests.replicas import Replica, master_keys, start_replicas, stop_replicas

pytestmark = pytest.mark.slow

SYNC_SECONDS = 1.0  # the default of AIDC_AUTH_SYNC_SECONDS
PASSWORD = "correct horse battery staple"


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def replicas(database_url: str, tmp_path: Path) -> Iterator[list[Replica]]:
    env = {"AIDC_DATABASE_URL": database_url, **master_keys()}
    running = start_replicas("auth", 2, tmp_path, env)
    yield running
    stop_replicas(running)


def _client(replica: Replica, token: str = "") -> AuthClient:
    client = AuthClient(create_channel(replica.address, load_settings(MeshSettings)))  # the hermetic environment
    if token:
        client.stub = _with_token(client.stub, token)  # type: ignore[assignment]
    return client


async def _admin_token(replicas: list[Replica]) -> str:
    [bootstrap] = [f for f in (r.data_dir / "auth" / "bootstrap-admin.json" for r in replicas) if f.exists()]
    password = json.loads(bootstrap.read_text())["password"]
    client = _client(replicas[1])
    try:
        return (await client.login("platform", "admin", password, new_password=ADMIN_PASSWORD)).access_token
    finally:
        await client.close()


async def test_two_replicas_starting_at_once_create_one_admin(replicas: list[Replica], database_url: str) -> None:
    files = [r.data_dir / "auth" / "bootstrap-admin.json" for r in replicas]
    assert sum(f.exists() for f in files) == 1, "exactly one replica created the admin and wrote its password"
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            admins = conn.execute(text("SELECT subject FROM principals WHERE tenant = 'platform'")).scalars().all()
            tenants = conn.execute(text("SELECT count(*) FROM tenants")).scalar_one()
            keys = conn.execute(text("SELECT count(*) FROM signing_keys")).scalar_one()
            created = conn.execute(text("SELECT count(*) FROM audit_events WHERE action = 'user.create'")).scalar_one()
    finally:
        engine.dispose()
    assert admins == ["user:platform/admin"] and tenants == 1 and keys == 1 and created == 1
    # The admin made through one replica logs in through the other.
    token = await _admin_token(replicas)
    client = _client(replicas[0], token)
    try:
        assert (await client.whoami()).subject == "user:platform/admin"
    finally:
        await client.close()


async def _until(predicate: object, timeout: float) -> float:
    """Seconds until ``await predicate()`` is true (AssertionError past ``timeout``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await predicate():  # type: ignore[operator]
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout} s")


async def test_a_role_revoked_through_one_replica_is_refused_by_the_other(replicas: list[Replica]) -> None:
    a, b = replicas
    token = await _admin_token(replicas)
    admin_a, admin_b = _client(a, token), _client(b, token)
    try:
        await admin_a.create_tenant("acme")
        await admin_a.create_user("acme", "alice", PASSWORD, ["developer"])

        async def b_allows() -> bool:
            return await admin_b.check_permission("user:acme/alice", "acme", "datasets", "write")

        granted = await _until(b_allows, timeout=SYNC_SECONDS + 5)
        # The user made through a is a user of b at once (the database is shared); her token from b works on a.
        alice_b = _client(b)
        alice_token = (await alice_b.login("acme", "alice", PASSWORD)).access_token
        await alice_b.close()

        started = time.monotonic()
        await admin_a.revoke_role("user:acme/alice", "developer", "acme")
        assert not await admin_a.check_permission("user:acme/alice", "acme", "datasets", "write"), "a: at once"

        async def b_refuses() -> bool:
            return not await b_allows()

        await _until(b_refuses, timeout=SYNC_SECONDS + 5)
        refused = time.monotonic() - started
        print(f"\nrole grant seen by the other replica after {granted:.2f} s, revocation after {refused:.2f} s")
        assert refused <= SYNC_SECONDS + 1.5, f"the revocation took {refused:.2f} s to apply on the other replica"
        alice_a = _client(a, alice_token)
        assert (await alice_a.whoami()).subject == "user:acme/alice"
        await alice_a.close()

        # Binding again through b is seen by a likewise (no replica is special).
        await admin_b.assign_role("user:acme/alice", "viewer", "acme")

        async def a_allows_read() -> bool:
            return await admin_a.check_permission("user:acme/alice", "acme", "datasets", "read")

        assert await _until(a_allows_read, timeout=SYNC_SECONDS + 5) <= SYNC_SECONDS + 1.5
    finally:
        await admin_a.close()
        await admin_b.close()


async def test_signing_key_rotation_and_revocations_reach_the_other_replica(replicas: list[Replica]) -> None:
    a, b = replicas
    token = await _admin_token(replicas)
    admin_a, admin_b = _client(a, token), _client(b, token)
    try:
        await admin_a.create_tenant("acme")
        await admin_a.create_user("acme", "alice", PASSWORD, ["developer"])
        kid = await admin_a.rotate_signing_key()

        async def b_publishes() -> bool:
            return kid in {key["kid"] for key in json.loads(await admin_b.get_jwks())["keys"]}

        await _until(b_publishes, timeout=SYNC_SECONDS + 5)
        # After its sync b signs with the new key too, and tokens either one signs verify on both.
        await asyncio.sleep(SYNC_SECONDS + 0.5)
        alice_b = _client(b)
        pair = await alice_b.login("acme", "alice", PASSWORD)
        await alice_b.close()
        header = json.loads(_b64(pair.access_token.split(".")[0]))
        assert header["kid"] == kid
        for replica in (a, b):
            client = _client(replica, pair.access_token)
            assert (await client.whoami()).subject == "user:acme/alice"
            await client.close()

        # A login ended through a: its access token is refused by b within the bound.
        logout = _client(a)
        await logout.logout(pair.refresh_token)
        await logout.close()

        async def b_refuses_token() -> bool:
            client = _client(b, pair.access_token)
            try:
                await client.whoami()
                return False
            except Exception:  # noqa: BLE001 - Unauthenticated once b knows the revocation
                return True
            finally:
                await client.close()

        assert await _until(b_refuses_token, timeout=SYNC_SECONDS + 5) <= SYNC_SECONDS + 1.5
    finally:
        await admin_a.close()
        await admin_b.close()


def _b64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
