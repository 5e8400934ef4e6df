"""Temporary smoke test."""

from __future__ import annotations

from tests.conftest import RunningAuth


async def test_login_and_create(auth: RunningAuth) -> None:
    anon = auth.client()
    tokens = await anon.login("platform", "admin", auth.admin_password)
    admin = auth.client(tokens.access_token)
    me = await admin.whoami()
    assert me.subject == "user:platform/admin"
    t = await admin.create_tenant("acme")
    assert t.name == "acme"
    u = await admin.create_user("acme", "alice", "correct horse battery", ["developer"])
    assert u.subject == "user:acme/alice"
