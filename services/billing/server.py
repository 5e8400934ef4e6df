"""Wiring of the billing service: database, store, core, the budget refresher, servicer and the mesh server."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.billing.config import BillingSettings
from services.billing.core.service import BillingCore, BillingPolicy
from services.billing.metrics import BillingMetrics
from services.billing.permissions import PERMISSIONS
from services.billing.servicer import BillingServicer
from services.billing.store import BillingStore
from services.gen.aidc.billing.v1 import billing_service_pb2_grpc
from services.mesh.db import open_database
from services.mesh.metrics import metrics_enabled
from services.mesh.security import mesh_security, secured_server
from services.mesh.server import MeshServer, Registration

__all__ = ["build_server", "SERVICE"]

SERVICE = "billing"

log = logging.getLogger(__name__)


async def _refresh_budgets(core: BillingCore, interval: float) -> None:
    """Keeps the budget read model fresh and raises budget alerts, every ``interval`` seconds. Every replica runs it
    (each holds its own read model; alerts are recorded once, under the store's write lock)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(core.refresh_budgets)
        except Exception:  # noqa: BLE001 - the next round retries; one failure must not stop the loop
            log.exception("refreshing budget views failed")


async def build_server(settings: BillingSettings, address: str | None = None) -> MeshServer:
    db = open_database(settings.database_url_for(SERVICE))
    store = BillingStore(db)
    policy = BillingPolicy(
        currency=settings.billing_currency,
        max_future_seconds=settings.billing_max_future_seconds,
        invoice_grace_seconds=settings.billing_invoice_grace_seconds,
    )
    core = BillingCore(store, policy, metrics=BillingMetrics(metrics_enabled(settings)))

    def start() -> None:
        with db.exclusive("billing-start"):  # replicas starting at once seed the default price book once
            core.start()

    await asyncio.to_thread(start)
    security = mesh_security(settings, SERVICE)
    servicer = BillingServicer(core, security.checker)
    refresher = asyncio.create_task(
        _refresh_budgets(core, settings.billing_budget_refresh_seconds), name="billing-budget-refresh"
    )

    async def close() -> None:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        db.dispose()

    return secured_server(
        SERVICE,
        settings,
        registrations=[
            Registration(
                "aidc.billing.v1.BillingService",
                lambda server: billing_service_pb2_grpc.add_BillingServiceServicer_to_server(servicer, server),
            )
        ],
        permissions=PERMISSIONS,
        on_stop=[close],
        address=address,
        security=security,
    )
