"""The auth service's rows of the authorization matrix (see tests/test_authorization_matrix.py)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from services.gen.aidc.auth.v1 import auth_service_pb2 as auth_pb
from tests.conftest import RunningAuth
from tests.matrix_support import ADMINS, EVERYONE, PASSWORD, PLATFORM, ServiceUnderTest

SERVICE = "aidc.auth.v1.AuthService"
DESCRIPTOR = auth_pb.DESCRIPTOR.services_by_name["AuthService"]

# Who may call each RPC on their own tenant (the platform admin acts on every tenant).
EXPECTED: dict[str, frozenset[str]] = {
    "CreateTenant": PLATFORM,
    "GetTenant": EVERYONE,
    "ListTenants": EVERYONE,
    "CreateUser": ADMINS,
    "ListUsers": frozenset({"tenant-admin", "developer", "viewer", "platform-admin"}),
    "CreateServiceAccount": ADMINS,
    "DisableUser": ADMINS,
    "EnableUser": ADMINS,
    "ChangePassword": EVERYONE,  # one's own password
    "CreateApiKey": frozenset({"tenant-admin", "developer", "platform-admin"}),
    "ListApiKeys": frozenset({"tenant-admin", "developer", "platform-admin"}),
    "RevokeApiKey": frozenset({"tenant-admin", "developer", "platform-admin"}),
    "Login": EVERYONE,
    "ExchangeApiKey": EVERYONE,
    "RefreshToken": EVERYONE,
    "Logout": EVERYONE,
    "GetJwks": EVERYONE,
    "GetRevocations": EVERYONE,
    "CreateDelegation": frozenset({"tenant-admin", "developer", "platform-admin"}),  # jobs:write
    "ExchangeDelegation": EVERYONE,  # the secret (and with mTLS the delegate's certificate) is the credential
    "RevokeDelegation": EVERYONE,
    "RotateSigningKey": PLATFORM,
    "WhoAmI": EVERYONE,
    "CheckPermission": ADMINS,  # about another subject; everyone may check themselves
    "BatchCheckPermission": ADMINS,
    "AssignRole": ADMINS,
    "RevokeRole": ADMINS,
    "ListRoleBindings": ADMINS,
    "ListAuditEvents": ADMINS,
}

#: RPCs whose decision does not depend on the tenant named in the request.
TENANT_FREE = {
    "ListTenants",
    "Login",
    "ExchangeApiKey",
    "RefreshToken",
    "Logout",
    "GetJwks",
    "GetRevocations",
    "ExchangeDelegation",
    "RevokeDelegation",
    "WhoAmI",
    "ChangePassword",
}

_counter = itertools.count()


def build_request(rpc: str, tenant: str) -> Any:
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
        # A subject that does not exist (NOT_FOUND once allowed): disabling a real user would end its tokens.
        "DisableUser": lambda: auth_pb.DisableUserRequest(tenant=tenant, subject=f"user:{tenant}/nobody"),
        "EnableUser": lambda: auth_pb.EnableUserRequest(tenant=tenant, subject=f"user:{tenant}/nobody"),
        # A new password too short (INVALID_ARGUMENT once allowed), so no password changes.
        "ChangePassword": lambda: auth_pb.ChangePasswordRequest(current_password=PASSWORD, new_password="short"),
        "CreateApiKey": lambda: auth_pb.CreateApiKeyRequest(tenant=tenant),
        "ListApiKeys": lambda: auth_pb.ListApiKeysRequest(tenant=tenant),
        "RevokeApiKey": lambda: auth_pb.RevokeApiKeyRequest(tenant=tenant, key_id="0123456789abcdef"),
        "Login": lambda: auth_pb.LoginRequest(tenant=tenant, name="dev", password="wrong password!"),
        "ExchangeApiKey": lambda: auth_pb.ExchangeApiKeyRequest(api_key="aidc_0123456789abcdef_nope"),
        "RefreshToken": lambda: auth_pb.RefreshTokenRequest(refresh_token="rt_x.y"),
        "Logout": lambda: auth_pb.LogoutRequest(refresh_token="rt_x.y"),
        "GetJwks": auth_pb.GetJwksRequest,
        "GetRevocations": auth_pb.GetRevocationsRequest,
        "CreateDelegation": lambda: auth_pb.CreateDelegationRequest(
            tenant=tenant, job_id=f"job-{n}", delegate="training"
        ),
        "ExchangeDelegation": lambda: auth_pb.ExchangeDelegationRequest(secret="dg_x.y"),
        "RevokeDelegation": lambda: auth_pb.RevokeDelegationRequest(secret="dg_x.y"),
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


@asynccontextmanager
async def serve(auth: RunningAuth, tmp_path: Path) -> AsyncIterator[str]:
    """The auth service is already running: its address."""
    yield auth.address


#: What only mesh services call (refused on the tenant path to everyone).
MESH_ONLY = frozenset(
    {
        "GetRevocations",
        "CreateDelegation",
        "ExchangeDelegation",
        "RevokeDelegation",
        "CheckPermission",
        "BatchCheckPermission",
    }
)

UNDER_TEST = ServiceUnderTest(SERVICE, DESCRIPTOR, EXPECTED, TENANT_FREE, build_request, serve, MESH_ONLY)
