"""The auth service's permission table: the rule of every RPC."""

from __future__ import annotations

from services.gen.aidc.auth.v1 import auth_service_pb2
from services.mesh.authz import PermissionTable, authenticated, mesh_only, platform_rule, public, tenant_rule

__all__ = ["PERMISSIONS"]

PERMISSIONS = PermissionTable.for_service(
    auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"],
    {
        "CreateTenant": platform_rule("tenants", "write"),
        "GetTenant": tenant_rule("tenants", "read"),
        # Platform admins see every tenant; everyone else only their own (decided in the core).
        "ListTenants": authenticated(),
        "CreateUser": tenant_rule("users", "write"),
        "ListUsers": tenant_rule("users", "read"),
        "CreateServiceAccount": tenant_rule("users", "write"),
        # Also the right to grant every role the subject holds (checked in the core).
        "DisableUser": tenant_rule("users", "write"),
        "EnableUser": tenant_rule("users", "write"),
        # Users change their own password (re-authenticating with the current one).
        "ChangePassword": authenticated(),
        # Anyone may hold keys for themselves; keys for others need users:write and the right to grant every role
        # the subject holds (checked in the core).
        "CreateApiKey": tenant_rule("apikeys", "write"),
        "ListApiKeys": tenant_rule("apikeys", "read"),
        "RevokeApiKey": tenant_rule("apikeys", "write"),
        "Login": public(),
        "ExchangeApiKey": public(),
        "RefreshToken": public(),
        # The refresh token (Logout) or the delegation secret (ExchangeDelegation, RevokeDelegation) is the
        # credential; with mutual TLS a delegation also needs its delegate's certificate (checked in the core).
        "Logout": public(),
        "GetJwks": public(),
        # Every service's token verifier reads it; tenants have no use for other accounts' revocations.
        "GetRevocations": mesh_only(public()),
        # A job's submitter lets the service running the job act for it there (the job's tenant only).
        # Mesh only: the training service asks, forwarding the submitter's token.
        "CreateDelegation": mesh_only(tenant_rule("jobs", "write")),
        "ExchangeDelegation": mesh_only(public()),
        "RevokeDelegation": mesh_only(public()),
        "RotateSigningKey": platform_rule("signing-keys", "write"),
        "WhoAmI": authenticated(),
        # Checking oneself is always allowed; checking others needs roles:read (checked in the core). Services ask
        # these for every request they authorize; tenants read their roles with WhoAmI.
        "CheckPermission": mesh_only(authenticated()),
        "BatchCheckPermission": mesh_only(authenticated()),
        # The binding's tenant is in binding.tenant, so the core checks roles:write there.
        "AssignRole": authenticated(),
        "RevokeRole": authenticated(),
        "ListRoleBindings": tenant_rule("roles", "read"),
        # Tenant admins see their tenant; platform admins every tenant (checked in the core).
        "ListAuditEvents": authenticated(),
    },
)
