"""Wiring of the auth service: database, policy engine, core, servicer, and the mesh server."""

from __future__ import annotations

from datetime import timedelta

from services.auth.config import AuthSettings
from services.auth.core.policy import PolicyEngine
from services.auth.core.service import AuthCore
from services.auth.core.tokens import KeyWrapper, SlowHasher
from services.auth.permissions import PERMISSIONS
from services.auth.servicer import AuthServicer
from services.auth.store import MIGRATIONS, AuthStore, CasbinAdapter
from services.gen.aidc.auth.v1 import auth_service_pb2_grpc
from services.mesh.db import open_database
from services.mesh.identity import Principal, TokenVerifier
from services.mesh.server import MeshServer, Registration

__all__ = ["build_server", "LocalPermissionChecker", "LocalTokenVerifier"]

SERVICE = "auth"


class LocalPermissionChecker:
    """Decisions straight from the in-process enforcer (no cache needed: it is the source)."""

    def __init__(self, core: AuthCore) -> None:
        self._core = core

    async def check(self, subject: str, tenant: str, resource: str, action: str) -> bool:
        return self._core.allowed(subject, tenant, resource, action)


class LocalTokenVerifier(TokenVerifier):
    """Verifies with the service's own keys, and also rejects tokens of revoked API keys."""

    def __init__(self, core: AuthCore) -> None:
        async def load() -> str:
            return core.jwks()

        super().__init__(load, refresh_interval_seconds=0.0)
        self._core = core

    async def verify(self, token: str) -> Principal:
        return self._core.ensure_active(await super().verify(token))


async def build_server(settings: AuthSettings, address: str | None = None) -> MeshServer:
    db = open_database(settings.database_url_for(SERVICE))
    db.migrate(MIGRATIONS, SERVICE)
    store = AuthStore(db)
    core = AuthCore(
        store,
        PolicyEngine(CasbinAdapter(store)),
        KeyWrapper(settings.master_key()),
        hasher=SlowHasher(settings.auth_argon2_time_cost, settings.auth_argon2_memory_kib),
        access_ttl=timedelta(seconds=settings.auth_access_token_ttl_seconds),
        refresh_ttl=timedelta(seconds=settings.auth_refresh_token_ttl_seconds),
    )
    core.bootstrap(settings.bootstrap_file)
    servicer = AuthServicer(core)

    async def close() -> None:
        db.dispose()

    return MeshServer(
        name=SERVICE,
        settings=settings,
        registrations=[
            Registration(
                "aidc.auth.v1.AuthService",
                lambda server: auth_service_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server),
            ),
        ],
        permissions=PERMISSIONS,
        verifier=LocalTokenVerifier(core),
        checker=LocalPermissionChecker(core),
        on_stop=[close],
        address=address,
    )
