"""Wiring of the storage service.

Until its issue [storage] lands, the service serves only health and reflection: it does not register
StorageService at all, so its RPCs answer UNIMPLEMENTED from gRPC itself rather than pretending to work.
"""

from __future__ import annotations

from services.mesh.authz import PermissionTable
from services.mesh.security import secured_server
from services.mesh.server import MeshServer
from services.storage.config import StorageSettings

__all__ = ["build_server", "SERVICE"]

SERVICE = "storage"


async def build_server(settings: StorageSettings, address: str | None = None) -> MeshServer:
    return secured_server(SERVICE, settings, registrations=[], permissions=PermissionTable({}), address=address)
