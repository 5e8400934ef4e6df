"""Wiring of the billing service.

Until its issue [billing] lands, the service serves only health and reflection: it does not register
BillingService at all, so its RPCs answer UNIMPLEMENTED from gRPC itself rather than pretending to work.
"""

from __future__ import annotations

from services.billing.config import BillingSettings
from services.mesh.authz import PermissionTable
from services.mesh.security import secured_server
from services.mesh.server import MeshServer

__all__ = ["build_server", "SERVICE"]

SERVICE = "billing"


async def build_server(settings: BillingSettings, address: str | None = None) -> MeshServer:
    return secured_server(SERVICE, settings, registrations=[], permissions=PermissionTable({}), address=address)
