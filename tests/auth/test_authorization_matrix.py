"""The authorization matrix: every RPC of every service that has RPCs x every role x own / other tenant,
called through the real servers, against an expectation table written out here by hand.

A new RPC fails this test until it gets a row here (and an entry in its service's permission table), so no
RPC can ship without a decision about who may call it.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from services.gen.aidc.auth.v1 import auth_service_pb2 as auth_pb
from services.mesh.authz import PermissionTable
from services.mesh.config import SERVICE_NAMES
from tests.conftest import RunningAuth

PASSWORD = "correct horse battery"
TENANT_ROLES = ("tenant-admin", "developer", "viewer", "billing-viewer")
ROLES = (*TENANT_ROLES, "platform-admin")
EVERYONE = frozenset(ROLES)
#: The user holding each tenant role, in both tenants.
USERS = {"tenant-admin": "tadmin", "developer": "dev", "viewer": "viewer", "billing-viewer": "billing"}
ADMINS = frozenset({"tenant-admin", "platform-admin"})
PLATFORM = frozenset({"platform-admin"})
#: RPCs whose decision does not depend on the tenant named in the request.
TENANT_FREE = {"ListTenants", "Login", "ExchangeApiKey", "RefreshToken", "GetJwks", "WhoAmI"}

# Who may call each RPC on their own tenant (the platform admin acts on every tenant). Anything else must be
# PERMISSION_DENIED; RPCs in TENANT_FREE behave the same for the other tenant.
EXPECTED: dict[str, dict[str, frozenset[str]]] = {
    "aidc.auth.v1.AuthService": {
        "CreateTenant": PLATFORM,
        "GetTenant": EVERYONE,
        "ListTenants": EVERYONE,
        "CreateUser": ADMINS,
        "ListUsers": frozenset({"tenant-admin", "developer", "viewer", "platform-admin"}),
        "CreateServiceAccount": ADMINS,
        "CreateApiKey": frozenset({"tenant-admin", "developer", "platform-admin"}),
        "ListApiKeys": frozenset({"tenant-admin", "developer", "platform-admin"}),
        "RevokeApiKey": frozenset({"tenant-admin", "developer", "platform-admin"}),
        "Login": EVERYONE,
        "ExchangeApiKey": EVERYONE,
        "RefreshToken": EVERYONE,
        "GetJwks": EVERYONE,
        "RotateSigningKey": PLATFORM,
        "WhoAmI": EVERYONE,
        "CheckPermission": ADMINS,  # about another subject; everyone may check themselves
        "BatchCheckPermission": ADMINS,
        "AssignRole": ADMINS,
        "RevokeRole": ADMINS,
        "ListRoleBindings": ADMINS,
        "ListAuditEvents": ADMINS,
    },
}

_counter = itertools.count()


def _auth_request(rpc: str, tenant: str) -> Any:
    """A well-formed request for an auth RPC that names ``tenant``."""
    n = next(_counter)
    check = auth_pb.PermissionCheck(
        subject=f"user:{tenant}/someone-else", tenant=tenant, resource="datasets", action="read"
    )
    binding = auth_pb.RoleBinding(subject=f"user:{tenant}/viewer", role="developer", tenant=tenant)
    requests: dict[str, Callable[[], Any]] = {
        "CreateTenant": lambda: auth_pb.CreateTenantRequest(name=f"new-{n}"),
        "GetTenant": lambda: auth_pb.GetTenantRequest(tenant=tenant),
        "ListTenants": auth_pb.ListTenantsRequest,
        "CreateUser": lambda: auth_pb.CreateUserRequest(tenant=tenant, name=f"u{n}", password=PASSWORD),
        "ListUsers": lambda: auth_pb.ListUsersRequest(tenant=tenant),
        "CreateServiceAccount": lambda: auth_pb.CreateServiceAccountRequest(tenant=tenant, name=f"sa{n}"),
        "CreateApiKey": lambda: auth_pb.CreateApiKeyRequest(tenant=tenant),
        "ListApiKeys": lambda: auth_pb.ListApiKeysRequest(tenant=tenant),
        "RevokeApiKey": lambda: auth_pb.RevokeApiKeyRequest(tenant=tenant, key_id="0123456789abcdef"),
        "Login": lambda: auth_pb.LoginRequest(tenant=tenant, name="dev", password="wrong password!"),
        "ExchangeApiKey": lambda: auth_pb.ExchangeApiKeyRequest(api_key="aidc_0123456789abcdef_nope"),
        "RefreshToken": lambda: auth_pb.RefreshTokenRequest(refresh_token="rt_x.y"),
        "GetJwks": auth_pb.GetJwksRequest,
        "RotateSigningKey": auth_pb.RotateSigningKeyRequest,
        "WhoAmI": auth_pb.WhoAmIRequest,
        "CheckPermission": lambda: auth_pb.CheckPermissionRequest(check=check),
        "BatchCheckPermission": lambda: auth_pb.BatchCheckPermissionRequest(checks=[check]),
        "AssignRole": lambda: auth_pb.AssignRoleRequest(binding=binding),
        "RevokeRole": lambda: auth_pb.RevokeRoleRequest(binding=binding),
        "ListRoleBindings": lambda: auth_pb.ListRoleBindingsRequest(tenant=tenant),
        "ListAuditEvents": lambda: auth_pb.ListAuditEventsRequest(tenant=tenant),
    }
    return requests[rpc]()


REQUEST_BUILDERS: dict[str, Callable[[str, str], Any]] = {"aidc.auth.v1.AuthService": _auth_request}


def _permission_tables() -> dict[str, PermissionTable]:
    """The permission table of every service that serves RPCs (a service's permissions.py module)."""
    tables = {}
    for name in SERVICE_NAMES:
        try:
            module = importlib.import_module(f"services.{name}.permissions")
        except ModuleNotFoundError:
            continue
        tables[name] = module.PERMISSIONS
    return tables


def test_every_rpc_has_a_permission_rule_and_an_expectation() -> None:
    tables = _permission_tables()
    assert "auth" in tables
    served = {method.strip("/") for table in tables.values() for method, _ in table.items()}
    expected = {f"{service}/{rpc}" for service, rpcs in EXPECTED.items() for rpc in rpcs}
    assert served == expected, "add the new RPC to EXPECTED (and its service's permission table)"


@pytest.fixture
async def principals(auth: RunningAuth) -> dict[str, str]:
    """Tokens of one user per tenant role in acme, plus the platform admin; globex exists too."""
    admin_token = (await auth.client().login("platform", "admin", auth.admin_password)).access_token
    admin = auth.client(admin_token)
    tokens = {"platform-admin": admin_token}
    for tenant in ("acme", "globex"):
        await admin.create_tenant(tenant)
        for role, name in USERS.items():
            await admin.create_user(tenant, name, PASSWORD, [role])
    for role, name in USERS.items():
        tokens[role] = (await auth.client().login("acme", name, PASSWORD)).access_token
    return tokens


async def test_authorization_matrix(auth: RunningAuth, principals: dict[str, str]) -> None:
    descriptors = {"aidc.auth.v1.AuthService": auth_pb.DESCRIPTOR.services_by_name["AuthService"]}
    mismatches = []
    async with grpc.aio.insecure_channel(auth.address) as channel:
        for service, rpcs in EXPECTED.items():
            descriptor = descriptors[service]
            for rpc, allowed_roles in rpcs.items():
                assert rpc in descriptor.methods_by_name
                call = channel.unary_unary(
                    f"/{service}/{rpc}",
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=lambda b: b,
                )
                for role, tenant in itertools.product(ROLES, ("acme", "globex")):
                    request = REQUEST_BUILDERS[service](rpc, tenant)
                    metadata = (("authorization", f"Bearer {principals[role]}"),)
                    try:
                        await call(request, metadata=metadata, timeout=10)
                        denied = False
                    except grpc.aio.AioRpcError as error:
                        denied = error.code() == grpc.StatusCode.PERMISSION_DENIED
                    own = tenant == "acme" or role == "platform-admin" or rpc in TENANT_FREE
                    expect_allowed = own and role in allowed_roles
                    if denied == expect_allowed:
                        mismatches.append(f"{rpc} as {role} on {tenant}: {'denied' if denied else 'allowed'}")
    assert not mismatches, "\n".join(mismatches)
