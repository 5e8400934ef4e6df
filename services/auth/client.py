"""The typed client of the auth service (the CLI, tests and other services use it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
from services.gen.aidc.auth.v1 import auth_service_pb2_grpc
from services.mesh.client import ServiceClient

__all__ = ["AuthClient", "BootstrapAdmin", "bootstrap_admin_file", "read_bootstrap_admin", "take_bootstrap_admin"]


@dataclass(frozen=True)
class BootstrapAdmin:
    """The first-start platform admin's one-time password, which the auth service leaves on disk for the operator."""

    tenant: str
    user: str
    password: str
    path: Path


def bootstrap_admin_file(data_dir: Path) -> Path:
    """Where the auth service using ``data_dir`` writes the first-start admin's one-time password (0600)."""
    return data_dir / "auth" / "bootstrap-admin.json"


def read_bootstrap_admin(data_dir: Path) -> BootstrapAdmin | None:
    """The first-start admin's one-time password if auth left one (show it once, then delete ``path``); None when
    the file is gone."""
    path = bootstrap_admin_file(data_dir)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return BootstrapAdmin(str(raw["tenant"]), str(raw["user"]), str(raw["password"]), path)


def take_bootstrap_admin(data_dir: Path) -> BootstrapAdmin | None:
    """read_bootstrap_admin, removing the file as it is read (it is shown once)."""
    admin = read_bootstrap_admin(data_dir)
    if admin is not None:
        admin.path.unlink(missing_ok=True)
    return admin


class AuthClient(ServiceClient):
    """Typed calls to AuthService; errors arrive as services.mesh.errors types."""

    def __init__(self, channel: grpc.aio.Channel, **kwargs: float) -> None:
        super().__init__(channel, **kwargs)  # type: ignore[arg-type]
        self.stub = auth_service_pb2_grpc.AuthServiceStub(channel)

    async def get_jwks(self) -> str:
        response = await self._unary(self.stub.GetJwks, pb.GetJwksRequest(), idempotent=True, timeout=3.0)
        return response.jwks_json

    async def check_permission(self, subject: str, tenant: str, resource: str, action: str) -> bool:
        check = pb.PermissionCheck(subject=subject, tenant=tenant, resource=resource, action=action)
        response = await self._unary(self.stub.CheckPermission, pb.CheckPermissionRequest(check=check), idempotent=True)
        return response.allowed

    async def login(self, tenant: str, name: str, password: str, new_password: str = "") -> pb.TokenPair:
        request = pb.LoginRequest(tenant=tenant, name=name, password=password, new_password=new_password)
        return (await self._unary(self.stub.Login, request)).tokens

    async def logout(self, refresh_token: str) -> None:
        await self._unary(self.stub.Logout, pb.LogoutRequest(refresh_token=refresh_token))

    async def change_password(self, current_password: str, new_password: str) -> None:
        request = pb.ChangePasswordRequest(current_password=current_password, new_password=new_password)
        await self._unary(self.stub.ChangePassword, request)

    async def disable_user(self, tenant: str, subject: str) -> pb.User:
        request = pb.DisableUserRequest(tenant=tenant, subject=subject)
        return (await self._unary(self.stub.DisableUser, request)).user

    async def enable_user(self, tenant: str, subject: str) -> pb.User:
        request = pb.EnableUserRequest(tenant=tenant, subject=subject)
        return (await self._unary(self.stub.EnableUser, request)).user

    async def create_delegation(
        self, tenant: str, job_id: str, delegate: str, ttl_seconds: int = 0
    ) -> pb.CreateDelegationResponse:
        request = pb.CreateDelegationRequest(tenant=tenant, job_id=job_id, delegate=delegate, ttl_seconds=ttl_seconds)
        return await self._unary(self.stub.CreateDelegation, request)

    async def exchange_delegation(self, secret: str) -> pb.TokenPair:
        request = pb.ExchangeDelegationRequest(secret=secret)
        return (await self._unary(self.stub.ExchangeDelegation, request)).tokens

    async def revoke_delegation(self, secret: str) -> None:
        await self._unary(self.stub.RevokeDelegation, pb.RevokeDelegationRequest(secret=secret), idempotent=True)

    async def get_revocations(self) -> list[pb.Revocation]:
        response = await self._unary(self.stub.GetRevocations, pb.GetRevocationsRequest(), idempotent=True)
        return list(response.revocations)

    async def exchange_api_key(self, api_key: str) -> pb.TokenPair:
        return (await self._unary(self.stub.ExchangeApiKey, pb.ExchangeApiKeyRequest(api_key=api_key))).tokens

    async def refresh_token(self, refresh_token: str) -> pb.TokenPair:
        request = pb.RefreshTokenRequest(refresh_token=refresh_token)
        return (await self._unary(self.stub.RefreshToken, request)).tokens

    async def whoami(self) -> pb.WhoAmIResponse:
        return await self._unary(self.stub.WhoAmI, pb.WhoAmIRequest(), idempotent=True)

    async def create_tenant(self, name: str, display_name: str = "") -> pb.Tenant:
        request = pb.CreateTenantRequest(name=name, display_name=display_name)
        return (await self._unary(self.stub.CreateTenant, request)).tenant

    async def create_user(self, tenant: str, name: str, password: str, roles: list[str] | None = None) -> pb.User:
        request = pb.CreateUserRequest(tenant=tenant, name=name, password=password, roles=roles or [])
        return (await self._unary(self.stub.CreateUser, request)).user

    async def create_service_account(self, tenant: str, name: str, roles: list[str] | None = None) -> pb.User:
        request = pb.CreateServiceAccountRequest(tenant=tenant, name=name, roles=roles or [])
        return (await self._unary(self.stub.CreateServiceAccount, request)).service_account

    async def create_api_key(
        self, tenant: str, subject: str = "", description: str = "", ttl_seconds: int = 0
    ) -> pb.CreateApiKeyResponse:
        request = pb.CreateApiKeyRequest(
            tenant=tenant, subject=subject, description=description, ttl_seconds=ttl_seconds
        )
        return await self._unary(self.stub.CreateApiKey, request)

    async def revoke_api_key(self, tenant: str, key_id: str) -> pb.ApiKey:
        request = pb.RevokeApiKeyRequest(tenant=tenant, key_id=key_id)
        return (await self._unary(self.stub.RevokeApiKey, request)).api_key

    async def list_api_keys(self, tenant: str) -> list[pb.ApiKey]:
        return list((await self._unary(self.stub.ListApiKeys, pb.ListApiKeysRequest(tenant=tenant))).api_keys)

    async def assign_role(self, subject: str, role: str, tenant: str) -> None:
        binding = pb.RoleBinding(subject=subject, role=role, tenant=tenant)
        await self._unary(self.stub.AssignRole, pb.AssignRoleRequest(binding=binding))

    async def revoke_role(self, subject: str, role: str, tenant: str) -> None:
        binding = pb.RoleBinding(subject=subject, role=role, tenant=tenant)
        await self._unary(self.stub.RevokeRole, pb.RevokeRoleRequest(binding=binding))

    async def list_role_bindings(self, tenant: str, subject: str = "") -> list[pb.RoleBinding]:
        request = pb.ListRoleBindingsRequest(tenant=tenant, subject=subject)
        return list((await self._unary(self.stub.ListRoleBindings, request, idempotent=True)).bindings)

    async def list_audit_events(self, tenant: str = "", page_size: int = 50) -> list[pb.AuditEvent]:
        from services.gen.aidc.common.v1 import common_pb2

        request = pb.ListAuditEventsRequest(tenant=tenant, page=common_pb2.PageRequest(page_size=page_size))
        return list((await self._unary(self.stub.ListAuditEvents, request, idempotent=True)).events)

    async def rotate_signing_key(self) -> str:
        return (await self._unary(self.stub.RotateSigningKey, pb.RotateSigningKeyRequest())).kid
