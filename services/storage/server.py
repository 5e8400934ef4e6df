"""Wiring of the storage service: database, object store, keyring, core, servicer, and the mesh server."""

from __future__ import annotations

from datetime import timedelta

from services.gen.aidc.storage.v1 import storage_service_pb2_grpc
from services.mesh.db import open_database
from services.mesh.security import mesh_security
from services.mesh.server import MeshServer, Registration
from services.storage.config import StorageSettings
from services.storage.core.crypto import LocalKeyring
from services.storage.core.service import StorageCore, TransferLimits
from services.storage.core.usage import UsageSink
from services.storage.objectstore import S3ObjectStore
from services.storage.permissions import PERMISSIONS
from services.storage.servicer import StorageServicer
from services.storage.store import MIGRATIONS, StorageStore

__all__ = ["build_server", "SERVICE"]

SERVICE = "storage"


async def build_server(
    settings: StorageSettings, address: str | None = None, *, usage: UsageSink | None = None
) -> MeshServer:
    """The storage server; ``usage`` receives usage events (none are sent anywhere until billing is wired)."""
    db = open_database(settings.database_url_for(SERVICE))
    db.migrate(MIGRATIONS, SERVICE)
    store = StorageStore(db)
    security = mesh_security(settings, SERVICE)
    core = StorageCore(
        store,
        S3ObjectStore(settings),
        LocalKeyring(settings.master_key(), store, db.run),
        security.checker,
        limits=TransferLimits(
            pipe_bytes=settings.storage_pipe_bytes,
            chunk_bytes=settings.storage_chunk_bytes,
            max_object_bytes=settings.storage_max_object_bytes,
            max_concurrent_transfers=settings.storage_max_concurrent_transfers,
            verify_uploads=settings.storage_verify_uploads,
            orphan_grace=timedelta(seconds=settings.storage_orphan_grace_seconds),
        ),
        usage=usage,
    )
    servicer = StorageServicer(core)

    async def ready() -> bool:
        return await security.auth_reachable() and await core.start()

    async def close() -> None:
        await core.close()
        db.dispose()

    return MeshServer(
        name=SERVICE,
        settings=settings,
        registrations=[
            Registration(
                "aidc.storage.v1.StorageService",
                lambda server: storage_service_pb2_grpc.add_StorageServiceServicer_to_server(servicer, server),
            ),
        ],
        permissions=PERMISSIONS,
        verifier=security.verifier,
        checker=security.checker,
        readiness=ready,
        on_stop=[close, security.close],
        address=address,
    )
