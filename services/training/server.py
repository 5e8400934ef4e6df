"""Wiring of the training service.

Until its issue [training] lands, the service serves only health and reflection: it does not register
TrainingService at all, so its RPCs answer UNIMPLEMENTED from gRPC itself rather than pretending to work.
"""

from __future__ import annotations

from services.mesh.authz import PermissionTable
from services.mesh.security import secured_server
from services.mesh.server import MeshServer
from services.training.config import TrainingSettings

__all__ = ["build_server", "SERVICE"]

SERVICE = "training"


async def build_server(settings: TrainingSettings, address: str | None = None) -> MeshServer:
    return secured_server(SERVICE, settings, registrations=[], permissions=PermissionTable({}), address=address)
