"""Wiring of the storage service: database, object store, keyring, core, storage metering to billing, servicer,
and the mesh server."""

from __future__ import annotations

import logging
from datetime import timedelta

from services.billing.client import UsageEmitter
from services.mesh.db import open_database
from services.mesh.leader import LeaderElection
from services.mesh.metrics import metrics_enabled
from services.mesh.security import mesh_security
from services.mesh.segments import AES_GCM_HKDF, CipherSuite
from services.mesh.server import MeshServer, Registration
from services.storage.config import StorageSettings
from services.storage.core.crypto import LocalKeyring
from services.storage.core.service import StorageCore, TransferLimits
from services.storage.core.usage import UsageSink
from services.storage.metering import StorageMeter
from services.storage.metrics import StorageMetrics
from services.storage.objectstore import S3ObjectStore
from services.storage.permissions import PERMISSIONS
from services.storage.schema import MIGRATIONS
from services.storage.servicer import StorageServicer
from services.storage.store import StorageStore
from services.storage.wire import add_storage_service

__all__ = ["build_server", "SERVICE"]

SERVICE = "storage"

log = logging.getLogger(__name__)


async def build_server(
    settings: StorageSettings,
    address: str | None = None,
    *,
    usage: UsageSink | None = None,
    cipher_suite: CipherSuite = AES_GCM_HKDF,
) -> MeshServer:
    """The storage server. Usage events (uploads, deletes, downloads) go to ``usage``; by default a StorageMeter
    reporting each tenant's storage_gib_hours to billing through the service's usage outbox
    (<data_dir>/storage/usage-outbox.db). Downloads are not metered: billing has no egress meter. The content
    cipher is a parameter only for the storage benchmark's transport floor (tests/bench/bench_storage.py)."""
    db = open_database(settings.database_url_for(SERVICE))
    db.migrate(MIGRATIONS, SERVICE)
    store = StorageStore(db)
    election = LeaderElection.for_service(db, settings, SERVICE)
    security = mesh_security(settings, SERVICE)
    emitter: UsageEmitter | None = None
    meter: StorageMeter | None = None
    if usage is None:
        emitter = UsageEmitter.for_service(settings, SERVICE)
        meter = StorageMeter(store, emitter, interval_seconds=settings.storage_metering_interval_seconds)
        # The periodic ticks run on one replica: the leader (see services/mesh/leader.py).
        election.lead("storage-metering", meter.run)
        usage = meter
    metrics = StorageMetrics(usage, metrics_enabled(settings))
    metrics.watch(store)
    usage = metrics
    # Billing takes usage only from a mesh service's certificate: without certificates (plaintext dev mode)
    # every delivery would fail, so usage is metered into the outbox and delivered once mTLS is configured.
    delivers_usage = settings.tls_dir() is not None
    keyring = LocalKeyring(settings.master_key(), store, db.run)
    keyring.check_master_key()
    core = StorageCore(
        store,
        S3ObjectStore(settings),
        keyring,
        security.checker,
        limits=TransferLimits(
            part_bytes=settings.storage_part_size_bytes,
            parallel_parts=settings.storage_parallel_parts,
            max_object_bytes=settings.storage_max_object_bytes,
            max_concurrent_transfers=settings.storage_max_concurrent_transfers,
            verify_uploads=settings.storage_verify_uploads,
            orphan_grace=timedelta(seconds=settings.storage_orphan_grace_seconds),
        ),
        usage=usage,
        cipher_suite=cipher_suite,
    )
    servicer = StorageServicer(core)

    async def ready() -> bool:
        if not (await security.auth_reachable() and await core.start()):
            return False
        await election.start()
        if emitter is not None:
            if delivers_usage:
                await emitter.start()
            else:
                log.warning("no mesh certificates: storage usage waits in %s until mTLS is set up", emitter.outbox.path)
        return True

    async def close() -> None:
        metrics.close()
        await core.close()
        await election.close()
        if emitter is not None:
            await emitter.close(flush_timeout=settings.shutdown_grace_seconds)
        db.dispose()

    return MeshServer(
        name=SERVICE,
        settings=settings,
        registrations=[
            Registration(
                "aidc.storage.v1.StorageService",
                lambda server: add_storage_service(servicer, server),
            ),
        ],
        permissions=PERMISSIONS,
        verifier=security.verifier,
        checker=security.checker,
        readiness=ready,
        on_stop=[close, security.close],
        address=address,
    )
