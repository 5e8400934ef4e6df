"""Auth state survives restarts; bad input gets a clear status and writes nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from services.auth.client import AuthClient
from services.auth.config import AuthSettings
from services.mesh import errors
from services.mesh.spanstore import SpanStore
from services.mesh.telemetry import init_telemetry, shutdown_telemetry
from tests.conftest import RunningAuth, start_auth

PASSWORD = "correct horse battery"


async def test_restart_keeps_users_keys_roles_and_audit(settings: AuthSettings) -> None:
    first = await start_auth(settings)
    admin_token = (await first.client().login("platform", "admin", first.admin_password)).access_token
    admin = first.client(admin_token)
    await admin.create_tenant("acme")
    await admin.create_user("acme", "alice", PASSWORD, ["developer"])
    await admin.assign_role("user:acme/alice", "viewer", "acme")
    key = await admin.create_api_key("acme", subject="user:acme/alice", description="ci")
    events_before = await admin.list_audit_events(page_size=100)
    await first.server.stop(0)
    assert settings.bootstrap_file.exists()
    settings.bootstrap_file.unlink()

    second = await start_auth(settings)
    try:
        assert not settings.bootstrap_file.exists(), "a restart must not create another admin"
        # The admin's old token still verifies: the signing key was persisted (encrypted).
        admin = second.client(admin_token)
        assert (await admin.whoami()).subject == "user:platform/admin"
        alice_token = (await second.client().login("acme", "alice", PASSWORD)).access_token
        assert (await second.client(alice_token).whoami()).subject == "user:acme/alice"
        key_token = (await second.client().exchange_api_key(key.secret)).access_token
        assert (await second.client(key_token).whoami()).subject == "user:acme/alice"
        roles = {(b.subject, b.role) for b in await admin.list_role_bindings("acme")}
        assert roles == {("user:acme/alice", "developer"), ("user:acme/alice", "viewer")}
        events_after = await admin.list_audit_events(page_size=100)
        assert [e.id for e in events_after][-len(events_before) :] == [e.id for e in events_before]
        actions = {e.action for e in events_after}
        assert {"tenant.create", "user.create", "role.assign", "apikey.create"} <= actions
    finally:
        await second.server.stop(0)


async def _state(admin: AuthClient) -> tuple[Any, ...]:
    """Everything a bad request could have written."""
    from services.gen.aidc.auth.v1 import auth_service_pb2 as pb

    tenants = await admin._unary(admin.stub.ListTenants, pb.ListTenantsRequest())
    users = await admin._unary(admin.stub.ListUsers, pb.ListUsersRequest(tenant="acme"))
    return (
        [t.name for t in tenants.tenants],
        [u.subject for u in users.users],
        [k.key_id for k in await admin.list_api_keys("acme")],
        [(b.subject, b.role) for b in await admin.list_role_bindings("acme")],
        len(await admin.list_audit_events(page_size=1000)),
    )


BAD_INPUT: list[tuple[str, Callable[[AuthClient], Awaitable[Any]], type[errors.AidcError], str]] = [
    ("empty tenant name", lambda a: a.create_tenant(""), errors.InvalidArgument, "required"),
    ("oversized tenant name", lambda a: a.create_tenant("a" * 41), errors.InvalidArgument, "3-40"),
    ("uppercase tenant name", lambda a: a.create_tenant("Acme"), errors.InvalidArgument, "lowercase"),
    ("reserved tenant", lambda a: a.create_tenant("platform"), errors.InvalidArgument, "reserved"),
    ("duplicate tenant", lambda a: a.create_tenant("acme"), errors.AlreadyExists, "already exists"),
    (
        "display name with control chars",
        lambda a: a.create_tenant("newco", "x\x00y"),
        errors.InvalidArgument,
        "control",
    ),
    ("empty user name", lambda a: a.create_user("acme", "", PASSWORD), errors.InvalidArgument, "required"),
    (
        "oversized user name",
        lambda a: a.create_user("acme", "u" * 65, PASSWORD),
        errors.InvalidArgument,
        "1-64",
    ),
    ("short password", lambda a: a.create_user("acme", "bob", "short"), errors.InvalidArgument, "password"),
    ("unknown tenant", lambda a: a.create_user("nope-co", "bob", PASSWORD), errors.NotFound, "nope-co"),
    ("duplicate user", lambda a: a.create_user("acme", "alice", PASSWORD), errors.AlreadyExists, "alice"),
    (
        "unknown role",
        lambda a: a.create_user("acme", "bob", PASSWORD, ["god"]),
        errors.InvalidArgument,
        "god",
    ),
    (
        "platform role in a tenant",
        lambda a: a.create_user("acme", "bob", PASSWORD, ["platform-admin"]),
        errors.InvalidArgument,
        "platform-admin",
    ),
    (
        "api key for unknown subject",
        lambda a: a.create_api_key("acme", subject="user:acme/ghost"),
        errors.NotFound,
        "ghost",
    ),
    (
        "negative api key ttl",
        lambda a: a.create_api_key("acme", subject="user:acme/alice", ttl_seconds=-1),
        errors.InvalidArgument,
        "ttl",
    ),
    (
        "revoke unknown key",
        lambda a: a.revoke_api_key("acme", "0123456789abcdef"),
        errors.NotFound,
        "not found",
    ),
    (
        "role for unknown subject",
        lambda a: a.assign_role("user:acme/ghost", "viewer", "acme"),
        errors.NotFound,
        "ghost",
    ),
    (
        "duplicate role binding",
        lambda a: a.assign_role("user:acme/alice", "developer", "acme"),
        errors.AlreadyExists,
        "already",
    ),
    (
        "revoke missing binding",
        lambda a: a.revoke_role("user:acme/alice", "viewer", "acme"),
        errors.NotFound,
        "no role",
    ),
    ("malformed api key", lambda a: a.exchange_api_key("not-a-key"), errors.Unauthenticated, "malformed"),
    ("empty api key", lambda a: a.exchange_api_key(""), errors.InvalidArgument, "required"),
    ("malformed refresh token", lambda a: a.refresh_token("garbage"), errors.Unauthenticated, "malformed"),
    (
        "wrong password",
        lambda a: a.login("acme", "alice", "wrong password!!"),
        errors.Unauthenticated,
        "wrong",
    ),
    (
        "short new password at login",
        lambda a: a.login("acme", "alice", PASSWORD, new_password="short"),
        errors.InvalidArgument,
        "new_password",
    ),
    ("short new password", lambda a: a.change_password("x" * 12, "short"), errors.InvalidArgument, "12"),
    ("change without current password", lambda a: a.change_password("", "x" * 12), errors.InvalidArgument, "current"),
    ("disable unknown subject", lambda a: a.disable_user("acme", "user:acme/ghost"), errors.NotFound, "ghost"),
    ("disable without subject", lambda a: a.disable_user("acme", ""), errors.InvalidArgument, "subject"),
    ("enable in unknown tenant", lambda a: a.enable_user("nope-co", "user:acme/alice"), errors.NotFound, "nope-co"),
    ("malformed logout", lambda a: a.logout("garbage"), errors.Unauthenticated, "malformed"),
    ("unknown refresh token at logout", lambda a: a.logout("rt_ab.cd"), errors.Unauthenticated, "unknown"),
    (
        "delegation to no service",
        lambda a: a.create_delegation("acme", "job-1", "nobody"),
        errors.InvalidArgument,
        "mesh service",
    ),
    ("malformed delegation", lambda a: a.exchange_delegation("garbage"), errors.Unauthenticated, "malformed"),
]


@pytest.mark.parametrize(("label", "call", "error", "fragment"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
async def test_bad_input_is_refused_and_writes_nothing(
    auth: RunningAuth,
    label: str,
    call: Callable[[AuthClient], Awaitable[Any]],
    error: type[errors.AidcError],
    fragment: str,
) -> None:
    admin = auth.client((await auth.client().login("platform", "admin", auth.admin_password)).access_token)
    await admin.create_tenant("acme")
    await admin.create_user("acme", "alice", PASSWORD, ["developer"])
    before = await _state(admin)
    with pytest.raises(error) as info:
        await call(admin)
    assert fragment in info.value.message, info.value.message
    after = await _state(admin)
    if error is errors.Unauthenticated and label == "wrong password":
        # A failed login is itself audited (and nothing else changes).
        assert after[:4] == before[:4] and after[4] == before[4] + 1
    else:
        assert after == before


async def test_tenant_admins_see_only_their_tenants_audit_events(auth: RunningAuth, tmp_path: Path) -> None:
    init_telemetry("auth", tmp_path)
    admin = auth.client((await auth.client().login("platform", "admin", auth.admin_password)).access_token)
    for tenant in ("acme", "globex"):
        await admin.create_tenant(tenant)
        await admin.create_user(tenant, "boss", PASSWORD, ["tenant-admin"])
        await admin.create_user(tenant, "worker", PASSWORD, ["developer"])
    boss = auth.client((await auth.client().login("acme", "boss", PASSWORD)).access_token)
    await boss.assign_role("user:acme/worker", "viewer", "acme")
    own = await boss.list_audit_events(page_size=100)  # no tenant named: the caller's own
    assert own and {e.tenant for e in own} == {"acme"}
    [assigned] = [e for e in own if e.action == "role.assign" and e.actor == "user:acme/boss"]
    shutdown_telemetry()
    # The event leads to the trace of the request that made the change.
    spans = SpanStore(tmp_path / "traces").spans(assigned.trace_id)
    assert any(s.name == "/aidc.auth.v1.AuthService/AssignRole" and s.kind == "SERVER" for s in spans)
    with pytest.raises(errors.PermissionDenied):
        await boss.list_audit_events("globex")
    everything = await admin.list_audit_events(page_size=1000)
    assert {"acme", "globex", "platform"} <= {e.tenant for e in everything}
