"""Wiring of the auth service: database, policy engine, cores, servicer, and the mesh server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from datetime import timedelta

from services.auth.config import AuthSettings
from services.auth.core.limits import LoginLimits, LoginThrottle
from services.auth.core.policy import PolicyEngine
from services.auth.core.service import AuthCore
from services.auth.core.sessions import SessionCore
from services.auth.core.tokens import KeyWrapper, SlowHasher
from services.auth.metrics import AuthMetrics
from services.auth.permissions import PERMISSIONS
from services.auth.servicer import AuthServicer
from services.auth.store import MIGRATIONS, AuthStore, CasbinAdapter
from services.gen.aidc.auth.v1 import auth_service_pb2_grpc
from services.mesh.db import open_database
from services.mesh.identity import Principal, TokenVerifier
from services.mesh.metrics import metrics_enabled
from services.mesh.server import MeshServer, Registration

__all__ = ["build_server", "LocalPermissionChecker", "LocalTokenVerifier"]

SERVICE = "auth"

log = logging.getLogger(__name__)


class LocalPermissionChecker:
    """Decisions straight from the in-process enforcer (no cache needed: it is the source)."""

    def __init__(self, core: AuthCore) -> None:
        self._core = core

    async def check(self, principal: Principal, tenant: str, resource: str, action: str) -> bool:
        return self._core.allowed_for(principal, tenant, resource, action)


class LocalTokenVerifier(TokenVerifier):
    """Verifies with the service's own keys and revocations; a revocation made here applies at once."""

    def __init__(self, sessions: SessionCore, refresh_seconds: float) -> None:
        async def jwks() -> str:
            return sessions.jwks()

        async def revocations() -> Mapping[str, float]:
            return sessions.revocations()

        # Both come from this process: refetched inline (never stale), not in the background as other services do.
        super().__init__(jwks, revocations, refresh_seconds=refresh_seconds, max_stale_seconds=refresh_seconds)
        self._sessions = sessions
        self._keys_generation = -1

    async def verify(self, token: str) -> Principal:
        if self._keys_generation != self._sessions.keys_generation:
            # The keys changed here or were reloaded from another replica: take them now, so a token signed with a
            # new key verifies at once (the base class would refuse an unknown kid until its next refetch).
            async with self._lock:
                generation = self._sessions.keys_generation
                await self._refresh()
                self._keys_generation = generation
        return self._sessions.ensure_active(await super().verify(token))


async def _sync_forever(core: AuthCore, interval: float) -> None:
    """Reloads what other replicas changed, every ``interval`` seconds (every replica runs this, not a leader)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await core.sync()
        except Exception:  # noqa: BLE001 - the next round retries; one failure must not stop the loop
            log.exception("reloading what other replicas changed failed")


async def build_server(settings: AuthSettings, address: str | None = None) -> MeshServer:
    db = open_database(settings.database_url_for(SERVICE))
    db.migrate(MIGRATIONS, SERVICE)
    store = AuthStore(db)
    limits = LoginLimits(
        attempts_per_second=settings.auth_login_rate_per_second,
        attempt_burst=settings.auth_login_burst,
        account_free_failures=settings.auth_login_account_free_failures,
        source_free_failures=settings.auth_login_source_free_failures,
        first_block_seconds=settings.auth_login_first_block_seconds,
        max_block_seconds=settings.auth_login_max_block_seconds,
    )
    sessions = SessionCore(
        store,
        KeyWrapper(settings.master_key()),
        hasher=SlowHasher(settings.auth_argon2_time_cost, settings.auth_argon2_memory_kib),
        throttle=LoginThrottle(limits),
        access_ttl=timedelta(seconds=settings.auth_access_token_ttl_seconds),
        refresh_ttl=timedelta(seconds=settings.auth_refresh_token_ttl_seconds),
        login_max_age=timedelta(seconds=settings.auth_login_max_age_seconds),
        delegation_ttl=timedelta(seconds=settings.auth_delegation_ttl_seconds),
        # With mutual TLS every mesh service has a certificate: a delegation is then usable only on its delegate's.
        delegates_need_certificates=settings.tls_dir() is not None and settings.client_auth == "require",
    )
    metrics = AuthMetrics(metrics_enabled(settings))
    core = AuthCore(store, PolicyEngine(CasbinAdapter(store), metrics), sessions, metrics=metrics)
    # Replicas starting at once on an empty database: one after the other, so exactly one creates the admin.
    with db.exclusive("auth-bootstrap"):
        core.bootstrap(settings.bootstrap_file)
    servicer = AuthServicer(core, sessions, settings.trusted_proxies())
    syncing = asyncio.create_task(_sync_forever(core, settings.auth_sync_seconds), name="auth-sync")

    async def close() -> None:
        syncing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await syncing
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
        verifier=LocalTokenVerifier(sessions, settings.revocation_refresh_seconds),
        checker=LocalPermissionChecker(core),
        on_stop=[close],
        address=address,
    )
