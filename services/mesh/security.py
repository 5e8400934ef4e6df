"""What every service other than auth needs from the auth service: access-token verification with auth's
published keys (JWKS) and cached authorization decisions from CheckPermission.

This talks to auth through the generated contract only, so the shared runtime does not depend on the auth
service's implementation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc

from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
from services.gen.aidc.auth.v1 import auth_service_pb2_grpc
from services.mesh.authz import CachedPermissionChecker, PermissionTable
from services.mesh.channels import service_channel
from services.mesh.client import ServiceClient
from services.mesh.config import MeshSettings
from services.mesh.identity import TokenVerifier
from services.mesh.server import MeshServer, Registration

__all__ = ["AuthDecisions", "MeshSecurity", "mesh_security", "secured_server"]


class AuthDecisions(ServiceClient):
    """The auth RPCs the mesh runtime uses: GetJwks, GetRevocations and CheckPermission."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        super().__init__(channel, timeout_seconds=3.0)
        self._stub = auth_service_pb2_grpc.AuthServiceStub(channel)

    async def jwks(self) -> str:
        return (await self._unary(self._stub.GetJwks, pb.GetJwksRequest(), idempotent=True)).jwks_json

    async def revocations(self) -> Mapping[str, float]:
        """Credential or subject -> tokens issued before this time (epoch seconds) are refused."""
        response = await self._unary(self._stub.GetRevocations, pb.GetRevocationsRequest(), idempotent=True)
        return {r.credential: r.issued_before.ToMicroseconds() / 1e6 for r in response.revocations}

    async def check(self, subject: str, tenant: str, resource: str, action: str) -> bool:
        """Asks auth; the caller's token is forwarded by the channel, so auth sees the end user."""
        check = pb.PermissionCheck(subject=subject, tenant=tenant, resource=resource, action=action)
        request = pb.CheckPermissionRequest(check=check)
        return (await self._unary(self._stub.CheckPermission, request, idempotent=True)).allowed


@dataclass(frozen=True)
class MeshSecurity:
    """A service's token verifier and permission checker, backed by the auth service."""

    auth: AuthDecisions
    verifier: TokenVerifier
    checker: CachedPermissionChecker

    async def auth_reachable(self) -> bool:
        """Readiness: the auth service answers and publishes keys."""
        return bool(await self.auth.jwks())

    async def close(self) -> None:
        await self.auth.close()


def mesh_security(settings: MeshSettings, service: str) -> MeshSecurity:
    """Security for service ``service`` (its certificate identity on mTLS channels)."""
    auth = AuthDecisions(service_channel("auth", settings, identity=service))
    return MeshSecurity(
        auth=auth,
        verifier=TokenVerifier(
            auth.jwks,
            auth.revocations,
            refresh_seconds=settings.revocation_refresh_seconds,
            max_stale_seconds=settings.revocation_max_stale_seconds,
        ),
        checker=CachedPermissionChecker(
            auth, ttl_seconds=settings.decision_cache_seconds, metrics=settings.metrics_addr != "off"
        ),
    )


def secured_server(
    name: str,
    settings: MeshSettings,
    registrations: Sequence[Registration],
    permissions: PermissionTable,
    *,
    readiness: Callable[[], Awaitable[bool]] | None = None,
    on_stop: Sequence[Callable[[], Awaitable[None]]] = (),
    address: str | None = None,
    tenant_address: str | None = None,
    security: MeshSecurity | None = None,
    forwarding: grpc.aio.ServerInterceptor | None = None,
) -> MeshServer:
    """A MeshServer for a service other than auth: callers verified with auth's keys, decisions from auth.

    It reports SERVING once auth is reachable and the service's own readiness check passes. A service that makes
    its own decisions too (the inference gateway) passes the ``security`` it also uses.
    """
    security = security or mesh_security(settings, name)

    async def ready() -> bool:
        return await security.auth_reachable() and (readiness is None or await readiness())

    return MeshServer(
        name=name,
        settings=settings,
        registrations=registrations,
        permissions=permissions,
        verifier=security.verifier,
        checker=security.checker,
        readiness=ready,
        on_stop=[*on_stop, security.close],
        address=address,
        tenant_address=tenant_address,
        forwarding=forwarding,
    )
