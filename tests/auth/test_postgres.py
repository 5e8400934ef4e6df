"""The auth service behaves the same on PostgreSQL as on SQLite, chosen only by AIDC_DATABASE_URL.

Every test runs twice: on the default SQLite file and on a fresh database in a private PostgreSQL cluster
(tests/postgres.py), through a real gRPC server with its interceptors.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, select, text

from services.auth.client import AuthClient
from services.auth.config import AuthSettings
from services.auth.store import AuditRecord, AuthStore, audit_events
from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
from services.gen.aidc.common.v1 import common_pb2
from services.mesh import errors
from services.mesh.db import open_database
from tests.auth.test_persistence_and_input import BAD_INPUT, PASSWORD, _state
from tests.conftest import RunningAuth, free_port, start_auth, tenant_addresses
from tests.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

BACKENDS = ["sqlite", "postgresql"]
NUL = "\x00"

# PostgreSQL text can't hold NUL (SQLite can), nor more than a column's declared length (SQLite ignores it).
# Such input must get the same answer on both backends, and never INTERNAL.
UNSTORABLE_INPUT: list[tuple[str, Callable[[AuthClient], Awaitable[Any]], type[errors.AidcError], str]] = [
    ("login name with NUL", lambda a: a.login("acme", f"al{NUL}ice", PASSWORD), errors.Unauthenticated, "wrong"),
    ("login tenant with NUL", lambda a: a.login(f"ac{NUL}me", "alice", PASSWORD), errors.Unauthenticated, "wrong"),
    ("tenant with NUL", lambda a: a.create_user(f"ac{NUL}me", "bob", PASSWORD), errors.NotFound, "not found"),
    (
        "api key subject with NUL",
        lambda a: a.create_api_key("acme", subject=f"user:acme/al{NUL}ice"),
        errors.NotFound,
        "not found",
    ),
    (
        "revoke key id with NUL",
        lambda a: a.revoke_api_key("acme", f"0123456789abcde{NUL}"),
        errors.NotFound,
        "not found",
    ),
    (
        "api key id with NUL",
        lambda a: a.exchange_api_key(f"aidc_0123456789abcde{NUL}_secret"),
        errors.Unauthenticated,
        "unknown",
    ),
    ("refresh token id with NUL", lambda a: a.refresh_token(f"rt_ab{NUL}.secret"), errors.Unauthenticated, "unknown"),
    (
        "role subject with NUL",
        lambda a: a.assign_role(f"user:acme/al{NUL}ice", "viewer", "acme"),
        errors.InvalidArgument,
        "control",
    ),
    (
        "service subject with NUL",
        lambda a: a.assign_role(f"service:fo{NUL}o", "service", "platform"),
        errors.InvalidArgument,
        "control",
    ),
    (
        "service subject too long for its column",
        lambda a: a.assign_role("service:" + "x" * 300, "service", "platform"),
        errors.InvalidArgument,
        "longer",
    ),
    (
        "page token with NUL",
        lambda a: a._unary(
            a.stub.ListUsers,
            pb.ListUsersRequest(
                tenant="acme", page=common_pb2.PageRequest(page_token=base64.urlsafe_b64encode(b"a\0").decode())
            ),
        ),
        errors.InvalidArgument,
        "page_token",
    ),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuthSettings]:
    """Auth settings from the environment; for PostgreSQL AIDC_DATABASE_URL is the only difference."""
    env = {
        "AIDC_DATA_DIR": str(tmp_path / "data"),
        "AIDC_AUTH_ADDR": f"127.0.0.1:{free_port()}",
        "AIDC_AUTH_ARGON2_TIME_COST": "1",
        "AIDC_AUTH_ARGON2_MEMORY_KIB": "1024",
        **tenant_addresses(),
    }
    if request.param == "postgresql":
        env["AIDC_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    yield AuthSettings.from_env(env)


async def _admin(running: RunningAuth) -> tuple[str, AuthClient]:
    token = (await running.client().login("platform", "admin", running.admin_password)).access_token
    return token, running.client(token)


async def test_schema_is_migrated_in_the_configured_database(backend: AuthSettings) -> None:
    running = await start_auth(backend)
    await running.server.stop(0)
    engine = create_engine(backend.database_url_for("auth"))
    try:
        with engine.connect() as conn:
            versions = list(conn.execute(text("SELECT version FROM schema_migrations")).scalars())
            tables = set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert versions == [1, 2, 3]
    assert {
        "tenants",
        "principals",
        "api_keys",
        "refresh_tokens",
        "signing_keys",
        "audit_events",
        "delegations",
        "revocations",
    } <= tables
    sqlite_files = list(backend.data_dir.rglob("*.db"))
    if backend.database_url:
        assert engine.dialect.name == "postgresql"
        assert sqlite_files == [], "with AIDC_DATABASE_URL set, no SQLite file may appear"
    else:
        assert engine.dialect.name == "sqlite" and len(sqlite_files) == 1


async def test_api_keys_and_refresh_rotation(backend: AuthSettings) -> None:
    running = await start_auth(backend)
    try:
        _, admin = await _admin(running)
        await admin.create_tenant("acme")
        await admin.create_user("acme", "alice", PASSWORD, ["developer"])
        key = await admin.create_api_key("acme", subject="user:acme/alice", description="ci")
        anon = running.client()
        key_token = (await anon.exchange_api_key(key.secret)).access_token
        assert (await running.client(key_token).whoami()).subject == "user:acme/alice"

        first = await anon.login("acme", "alice", PASSWORD)
        second = await anon.refresh_token(first.refresh_token)
        assert second.refresh_token != first.refresh_token
        assert (await running.client(second.access_token).whoami()).subject == "user:acme/alice"
        with pytest.raises(errors.Unauthenticated, match="reused"):
            await anon.refresh_token(first.refresh_token)
        with pytest.raises(errors.Unauthenticated, match="revoked"):
            await anon.refresh_token(second.refresh_token)

        await admin.revoke_api_key("acme", key.api_key.key_id)
        with pytest.raises(errors.Unauthenticated, match="revoked"):
            await anon.exchange_api_key(key.secret)
        actions = [e.action for e in await admin.list_audit_events(page_size=100)]
        assert {"apikey.create", "apikey.revoke", "token.reuse_detected"} <= set(actions)
    finally:
        await running.server.stop(0)


async def test_bad_input_is_refused_and_writes_nothing(backend: AuthSettings) -> None:
    running = await start_auth(backend)
    try:
        _, admin = await _admin(running)
        await admin.create_tenant("acme")
        await admin.create_user("acme", "alice", PASSWORD, ["developer"])
        assert await admin.list_audit_events(tenant=f"ac{NUL}me") == []
        for label, call, error, fragment in BAD_INPUT + UNSTORABLE_INPUT:
            before = await _state(admin)
            with pytest.raises(error) as info:
                await call(admin)
            assert fragment in info.value.message, (label, info.value.message)
            after = await _state(admin)
            if label == "wrong password":
                assert after[:4] == before[:4] and after[4] == before[4] + 1, label
            else:
                assert after == before, label

        # Concurrent creates of one user race past the existence check; the database's unique constraint
        # decides, and the losers get ALREADY_EXISTS (never INTERNAL).
        results = await asyncio.gather(
            *(admin.create_user("acme", "bob", PASSWORD) for _ in range(6)),
            return_exceptions=True,
        )
        assert sum(isinstance(r, pb.User) for r in results) == 1, results
        assert all(isinstance(r, pb.User | errors.AlreadyExists) for r in results), results
        events = await admin.list_audit_events(page_size=1000)
        assert [e.target for e in events if e.action == "user.create"].count("user:acme/bob") == 1
    finally:
        await running.server.stop(0)


def test_store_maps_unique_violations_and_rolls_back(backend: AuthSettings) -> None:
    """The store's own mapping, below the core's existence checks: a duplicate insert is AlreadyExists and
    its audit event is rolled back with it."""
    from services.auth.store import MIGRATIONS

    db = open_database(backend.database_url_for("auth"))
    try:
        db.migrate(MIGRATIONS, "auth")
        store = AuthStore(db)
        now = datetime.now(UTC)

        def audit(n: int) -> AuditRecord:
            return AuditRecord(f"ae_{n}", now, "test", "acme", "tenant.create", "tenant:acme", "", {"n": n})

        store.create_tenant("acme", "Acme", now, [("p", "developer", "acme", "models", "read")], audit(1))
        with pytest.raises(errors.AlreadyExists):
            store.create_tenant("acme", "Acme again", now, [], audit(2))
        with pytest.raises(errors.AlreadyExists):  # the policy line is unique too
            store.change_policy([("p", "developer", "acme", "models", "read")], [], audit(3))
        with db.engine.connect() as conn:
            assert list(conn.execute(select(audit_events.c.id)).scalars()) == ["ae_1"]
        row = store.get_tenant("acme")
        assert row is not None and row.display_name == "Acme"
        # The same instant comes back: SQLite returns it naive (UTC), PostgreSQL aware in the session's zone.
        created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
        assert created == now
    finally:
        db.dispose()


async def test_audit_pagination(backend: AuthSettings) -> None:
    running = await start_auth(backend)
    try:
        _, admin = await _admin(running)
        for i in range(7):
            await admin.create_tenant(f"tenant-{i}")
        everything = [e.id for e in await admin.list_audit_events(page_size=1000)]
        assert len(everything) >= 10
        paged: list[str] = []
        token = ""
        while True:
            request = pb.ListAuditEventsRequest(page=common_pb2.PageRequest(page_size=3, page_token=token))
            response = await admin._unary(admin.stub.ListAuditEvents, request)
            assert len(response.events) <= 3
            paged += [e.id for e in response.events]
            token = response.page.next_page_token
            if not token:
                break
        assert paged == everything, "pages must cover the log once, newest first, with no gaps or repeats"
        times = [e.time.ToDatetime() for e in await admin.list_audit_events(page_size=1000)]
        assert times == sorted(times, reverse=True)
        with pytest.raises(errors.InvalidArgument):
            bad_token = common_pb2.PageRequest(page_token="bm90LWEtbnVtYmVy")  # base64 of "not-a-number"
            await admin._unary(admin.stub.ListAuditEvents, pb.ListAuditEventsRequest(page=bad_token))
    finally:
        await running.server.stop(0)


async def test_restart_on_the_same_database_keeps_everything(backend: AuthSettings) -> None:
    first = await start_auth(backend)
    try:
        admin_token, admin = await _admin(first)
        await admin.create_tenant("acme")
        await admin.create_user("acme", "alice", PASSWORD, ["developer"])
        await admin.assign_role("user:acme/alice", "viewer", "acme")
        key = await admin.create_api_key("acme", subject="user:acme/alice", description="ci")
        revoked = await admin.create_api_key("acme", subject="user:acme/alice", description="leaked")
        revoked_token = (await first.client().exchange_api_key(revoked.secret)).access_token
        await admin.revoke_api_key("acme", revoked.api_key.key_id)
        # The admin's token is now signed by a retired key, which must still verify after the restart.
        await admin.rotate_signing_key()
        refresh = (await first.client().login("acme", "alice", PASSWORD)).refresh_token
        events_before = [e.id for e in await admin.list_audit_events(page_size=1000)]
    finally:
        await first.server.stop(0)
    backend.bootstrap_file.unlink()

    second = await start_auth(backend)
    try:
        assert not backend.bootstrap_file.exists(), "a restart must not create another admin"
        admin = second.client(admin_token)
        assert (await admin.whoami()).subject == "user:platform/admin"
        anon = second.client()
        alice_token = (await anon.login("acme", "alice", PASSWORD)).access_token
        assert (await second.client(alice_token).whoami()).subject == "user:acme/alice"
        key_token = (await anon.exchange_api_key(key.secret)).access_token
        assert (await second.client(key_token).whoami()).subject == "user:acme/alice"
        assert (await anon.refresh_token(refresh)).access_token
        with pytest.raises(errors.Unauthenticated, match="revoked"):  # revocations are persisted
            await second.client(revoked_token).whoami()
        roles = {(b.subject, b.role) for b in await admin.list_role_bindings("acme")}
        assert roles == {("user:acme/alice", "developer"), ("user:acme/alice", "viewer")}
        assert {k.key_id for k in await admin.list_api_keys("acme")} == {key.api_key.key_id, revoked.api_key.key_id}
        events_after = [e.id for e in await admin.list_audit_events(page_size=1000)]
        assert events_after[-len(events_before) :] == events_before
        with pytest.raises(errors.AlreadyExists):
            await admin.create_user("acme", "alice", PASSWORD)
    finally:
        await second.server.stop(0)
    engine = create_engine(backend.database_url_for("auth"))
    try:
        with engine.connect() as conn:
            assert list(conn.execute(text("SELECT version FROM schema_migrations")).scalars()) == [1, 2, 3]
            assert conn.execute(text("SELECT count(*) FROM signing_keys")).scalar_one() == 2
    finally:
        engine.dispose()


async def test_migration_2_upgrades_a_database_of_the_first_schema(backend: AuthSettings) -> None:
    """A database made before disabled users, expiring passwords, login lifetimes, revocations and delegations
    existed: migration 2 adds them, and what was stored keeps working (a refresh token without a login lifetime
    gets one counted from its creation)."""
    first = await start_auth(backend)
    try:
        _, admin = await _admin(first)
        await admin.create_tenant("acme")
        await admin.create_user("acme", "alice", PASSWORD, ["developer"])
        refresh = (await first.client().login("acme", "alice", PASSWORD)).refresh_token
    finally:
        await first.server.stop(0)
    engine = create_engine(backend.database_url_for("auth"))
    try:
        with engine.begin() as conn:  # back to the first schema
            conn.execute(text("DROP TABLE delegations"))
            conn.execute(text("DROP TABLE revocations"))
            for table, column in (
                ("principals", "disabled_at"),
                ("principals", "password_expires_at"),
                ("refresh_tokens", "family_expires_at"),
            ):
                conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
            conn.execute(text("DELETE FROM schema_migrations WHERE component = 'auth' AND version = 2"))
    finally:
        engine.dispose()

    second = await start_auth(backend)
    try:
        _, admin = await _admin(second)
        pair = await second.client().refresh_token(refresh)
        assert pair.refresh_token_expire_time.seconds > 0
        assert (await second.client().refresh_token(pair.refresh_token)).access_token
        await admin.disable_user("acme", "user:acme/alice")
        with pytest.raises(errors.Unauthenticated, match="disabled"):
            await second.client().login("acme", "alice", PASSWORD)
        created = await admin.create_delegation("acme", "job-1", "training")
        assert (await second.client().exchange_delegation(created.secret)).access_token
    finally:
        await second.server.stop(0)
