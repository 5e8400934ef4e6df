"""AuthService RPCs: translation between protobuf messages and AuthCore calls, nothing else."""

from __future__ import annotations

import json
from typing import Any

from grpc.aio import ServicerContext

from services.auth.core.service import ApiKeyInfo, AuthCore, PrincipalInfo, TenantInfo, TokenPair
from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
from services.gen.aidc.auth.v1 import auth_service_pb2_grpc
from services.gen.aidc.common.v1 import common_pb2
from services.mesh.identity import require_principal
from services.mesh.messages import timestamp

__all__ = ["AuthServicer"]

_KINDS = {
    "user": pb.PRINCIPAL_KIND_USER,
    "service_account": pb.PRINCIPAL_KIND_SERVICE_ACCOUNT,
    "service": pb.PRINCIPAL_KIND_SERVICE,
}


def _tenant(t: TenantInfo) -> pb.Tenant:
    return pb.Tenant(name=t.name, display_name=t.display_name, create_time=timestamp(t.created_at))


def _user(p: PrincipalInfo) -> pb.User:
    return pb.User(
        subject=p.subject, tenant=p.tenant, name=p.name, kind=_KINDS[p.kind], create_time=timestamp(p.created_at)
    )


def _api_key(k: ApiKeyInfo) -> pb.ApiKey:
    return pb.ApiKey(
        key_id=k.key_id,
        subject=k.subject,
        tenant=k.tenant,
        description=k.description,
        create_time=timestamp(k.created_at),
        expire_time=timestamp(k.expires_at),
        revoked=k.revoked,
    )


def _tokens(t: TokenPair) -> pb.TokenPair:
    return pb.TokenPair(
        access_token=t.access_token,
        access_token_expire_time=timestamp(t.access_expires),
        refresh_token=t.refresh_token,
        refresh_token_expire_time=timestamp(t.refresh_expires),
    )


def _page(token: str) -> common_pb2.PageResponse:
    return common_pb2.PageResponse(next_page_token=token)


class AuthServicer(auth_service_pb2_grpc.AuthServiceServicer):
    """Each RPC: unpack, call the core, pack."""

    def __init__(self, core: AuthCore) -> None:
        self._core = core

    async def CreateTenant(self, request: pb.CreateTenantRequest, context: ServicerContext) -> Any:
        tenant = self._core.create_tenant(require_principal(), request.name, request.display_name)
        return pb.CreateTenantResponse(tenant=_tenant(tenant))

    async def GetTenant(self, request: pb.GetTenantRequest, context: ServicerContext) -> Any:
        return pb.GetTenantResponse(tenant=_tenant(self._core.get_tenant(request.tenant)))

    async def ListTenants(self, request: pb.ListTenantsRequest, context: ServicerContext) -> Any:
        page = self._core.list_tenants(require_principal(), request.page.page_size, request.page.page_token)
        return pb.ListTenantsResponse(tenants=[_tenant(t) for t in page.items], page=_page(page.next_token))

    async def CreateUser(self, request: pb.CreateUserRequest, context: ServicerContext) -> Any:
        user = await self._core.create_principal(
            require_principal(), "user", request.tenant, request.name, request.password, list(request.roles)
        )
        return pb.CreateUserResponse(user=_user(user))

    async def ListUsers(self, request: pb.ListUsersRequest, context: ServicerContext) -> Any:
        page = self._core.list_principals(request.tenant, request.page.page_size, request.page.page_token)
        return pb.ListUsersResponse(users=[_user(u) for u in page.items], page=_page(page.next_token))

    async def CreateServiceAccount(self, request: pb.CreateServiceAccountRequest, context: ServicerContext) -> Any:
        account = await self._core.create_principal(
            require_principal(), "service_account", request.tenant, request.name, "", list(request.roles)
        )
        return pb.CreateServiceAccountResponse(service_account=_user(account))

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: ServicerContext) -> Any:
        key, secret = await self._core.create_api_key(
            require_principal(), request.tenant, request.subject, request.description, request.ttl_seconds
        )
        return pb.CreateApiKeyResponse(api_key=_api_key(key), secret=secret)

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: ServicerContext) -> Any:
        page = self._core.list_api_keys(request.tenant, request.page.page_size, request.page.page_token)
        return pb.ListApiKeysResponse(api_keys=[_api_key(k) for k in page.items], page=_page(page.next_token))

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: ServicerContext) -> Any:
        key = self._core.revoke_api_key(require_principal(), request.tenant, request.key_id)
        return pb.RevokeApiKeyResponse(api_key=_api_key(key))

    async def Login(self, request: pb.LoginRequest, context: ServicerContext) -> Any:
        tokens = await self._core.login(request.tenant, request.name, request.password)
        return pb.LoginResponse(tokens=_tokens(tokens))

    async def ExchangeApiKey(self, request: pb.ExchangeApiKeyRequest, context: ServicerContext) -> Any:
        return pb.ExchangeApiKeyResponse(tokens=_tokens(await self._core.exchange_api_key(request.api_key)))

    async def RefreshToken(self, request: pb.RefreshTokenRequest, context: ServicerContext) -> Any:
        return pb.RefreshTokenResponse(tokens=_tokens(self._core.refresh(request.refresh_token)))

    async def GetJwks(self, request: pb.GetJwksRequest, context: ServicerContext) -> Any:
        return pb.GetJwksResponse(jwks_json=self._core.jwks())

    async def RotateSigningKey(self, request: pb.RotateSigningKeyRequest, context: ServicerContext) -> Any:
        return pb.RotateSigningKeyResponse(kid=self._core.rotate_signing_key(require_principal()))

    async def WhoAmI(self, request: pb.WhoAmIRequest, context: ServicerContext) -> Any:
        caller = require_principal()
        bindings = [
            pb.RoleBinding(subject=s, role=r, tenant=t) for s, r, t in self._core.bindings(None, caller.subject)
        ]
        return pb.WhoAmIResponse(
            subject=caller.subject,
            tenant=caller.tenant,
            kind=_KINDS.get(caller.kind, pb.PRINCIPAL_KIND_UNSPECIFIED),
            role_bindings=bindings,
        )

    async def CheckPermission(self, request: pb.CheckPermissionRequest, context: ServicerContext) -> Any:
        c = request.check
        allowed = self._core.check(require_principal(), c.subject, c.tenant, c.resource, c.action)
        return pb.CheckPermissionResponse(allowed=allowed)

    async def BatchCheckPermission(self, request: pb.BatchCheckPermissionRequest, context: ServicerContext) -> Any:
        checks = [(c.subject, c.tenant, c.resource, c.action) for c in request.checks]
        decisions = await self._core.check_all(require_principal(), checks)
        return pb.BatchCheckPermissionResponse(allowed=decisions)

    async def AssignRole(self, request: pb.AssignRoleRequest, context: ServicerContext) -> Any:
        b = request.binding
        self._core.assign_role(require_principal(), b.subject, b.role, b.tenant)
        return pb.AssignRoleResponse(binding=b)

    async def RevokeRole(self, request: pb.RevokeRoleRequest, context: ServicerContext) -> Any:
        b = request.binding
        self._core.revoke_role(require_principal(), b.subject, b.role, b.tenant)
        return pb.RevokeRoleResponse(binding=b)

    async def ListRoleBindings(self, request: pb.ListRoleBindingsRequest, context: ServicerContext) -> Any:
        bindings = self._core.bindings(request.tenant, request.subject or None)
        return pb.ListRoleBindingsResponse(
            bindings=[pb.RoleBinding(subject=s, role=r, tenant=t) for s, r, t in bindings]
        )

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: ServicerContext) -> Any:
        page = self._core.list_audit(
            require_principal(), request.tenant, request.page.page_size, request.page.page_token
        )
        events = [
            pb.AuditEvent(
                id=e.id,
                time=timestamp(e.time),
                actor=e.actor,
                tenant=e.tenant,
                action=e.action,
                target=e.target,
                trace_id=e.trace_id,
                details_json=json.dumps(e.details, sort_keys=True),
            )
            for e in page.items
        ]
        return pb.ListAuditEventsResponse(events=events, page=_page(page.next_token))
