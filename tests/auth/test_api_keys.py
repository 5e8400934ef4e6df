"""Who may create API keys for whom: oneself always; another subject only with users:write in its tenant and the
right to grant every role it holds (a platform-domain role needs platform rights). Through the real auth server."""

from __future__ import annotations

import pytest

from services.mesh.errors import PermissionDenied
from tests.conftest import RunningAuth

PASSWORD = "correct horse battery"


async def test_a_tenant_admin_cannot_mint_a_key_for_a_member_holding_a_platform_role(auth: RunningAuth) -> None:
    admin = auth.client((await auth.client().login("platform", "admin", auth.admin_password)).access_token)
    await admin.create_tenant("acme")
    await admin.create_user("acme", "boss", PASSWORD, ["tenant-admin"])
    await admin.create_user("acme", "boss2", PASSWORD, ["tenant-admin"])
    await admin.create_user("acme", "dev", PASSWORD, ["developer"])
    await admin.create_user("acme", "ops", PASSWORD, ["developer"])
    await admin.assign_role("user:acme/ops", "platform-admin", "platform")  # an operator who is also in acme
    await admin.create_service_account("acme", "ci", ["developer"])
    boss = auth.client((await auth.client().login("acme", "boss", PASSWORD)).access_token)
    before = [k.key_id for k in await admin.list_api_keys("acme")]

    with pytest.raises(PermissionDenied, match="platform-admin"):
        await boss.create_api_key("acme", subject="user:acme/ops")
    assert [k.key_id for k in await admin.list_api_keys("acme")] == before  # nothing was created

    # What the tenant admin may grant, it may mint keys for: members with tenant roles, service accounts, itself.
    for subject in ("user:acme/dev", "sa:acme/ci", "user:acme/boss2", ""):
        created = await boss.create_api_key("acme", subject=subject)
        assert created.api_key.subject == (subject or "user:acme/boss")
    # A developer may mint keys only for itself.
    dev = auth.client((await auth.client().login("acme", "dev", PASSWORD)).access_token)
    assert (await dev.create_api_key("acme")).api_key.subject == "user:acme/dev"
    for subject in ("user:acme/boss", "sa:acme/ci"):
        with pytest.raises(PermissionDenied):
            await dev.create_api_key("acme", subject=subject)
    # The platform admin may mint one for the operator; the operator's key carries the operator's rights.
    key = await admin.create_api_key("acme", subject="user:acme/ops")
    ops = auth.client((await auth.client().exchange_api_key(key.secret)).access_token)
    await ops.create_tenant("newco")
