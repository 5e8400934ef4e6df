"""Wiring of the training service: database, base-model catalog, storage client, executor, billing usage, core,
servicer, and the mesh server."""

from __future__ import annotations

import logging
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from services.auth.client import AuthClient
from services.billing.client import UsageEmitter
from services.gen.aidc.training.v1 import training_service_pb2_grpc
from services.mesh.channels import create_channel
from services.mesh.db import open_database
from services.mesh.metrics import metrics_enabled
from services.mesh.security import secured_server
from services.mesh.server import MeshServer, Registration
from services.storage.client import StorageClient
from services.training.artifacts import StorageArtifacts
from services.training.config import TrainingSettings
from services.training.core.catalog import BaseModelCatalog, shipped_models
from services.training.core.executor import Executor, LocalExecutor
from services.training.core.service import JobOptions, TrainingCore
from services.training.delegations import JobDelegations
from services.training.metrics import TrainingMetrics
from services.training.permissions import PERMISSIONS
from services.training.servicer import TrainingServicer
from services.training.store import MIGRATIONS, TrainingStore

__all__ = ["build_server", "code_version", "SERVICE"]

SERVICE = "training"

log = logging.getLogger(__name__)


def code_version() -> str:
    """aidc's package version, plus the git commit when running from a checkout."""
    try:
        package = version("aidc")
    except PackageNotFoundError:
        package = "unknown"
    root = Path(__file__).resolve().parent.parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"aidc {package}" + (f" (git {commit})" if commit else "")


async def build_server(
    settings: TrainingSettings,
    address: str | None = None,
    *,
    executor: Executor | None = None,
    extra_base_models: dict[str, Path] | None = None,
) -> MeshServer:
    db = open_database(settings.database_url_for(SERVICE))
    db.migrate(MIGRATIONS, SERVICE)
    storage = StorageClient(create_channel(settings.storage_addr, settings, identity=SERVICE))
    auth = AuthClient(create_channel(settings.auth_addr, settings, identity=SERVICE))
    emitter = UsageEmitter.for_service(settings, SERVICE)
    store = TrainingStore(db)
    metrics = TrainingMetrics(metrics_enabled(settings))
    metrics.watch(store)
    core = TrainingCore(
        store,
        BaseModelCatalog({**shipped_models(), **(extra_base_models or {})}),
        StorageArtifacts(storage),
        executor or LocalExecutor(),
        JobOptions(
            jobs_dir=settings.jobs_dir,
            base_models_dir=settings.base_models_dir,
            max_concurrent_jobs=settings.training_max_concurrent_jobs,
            progress_interval_seconds=settings.training_progress_interval_seconds,
            runner_threads=settings.training_runner_threads,
            code_version=code_version(),
        ),
        usage=emitter,
        credentials=JobDelegations(auth, settings.master_key(), SERVICE),
        metrics=metrics,
    )
    servicer = TrainingServicer(core)
    # Billing takes usage only from a mesh service's certificate: without certificates (plaintext dev mode) the
    # usage waits in the outbox until mTLS is configured.
    delivers_usage = settings.tls_dir() is not None

    async def ready() -> bool:
        if delivers_usage:
            await emitter.start()
        return await core.start()

    async def close() -> None:
        metrics.close()
        await core.close()
        await emitter.close(flush_timeout=settings.shutdown_grace_seconds)
        await storage.close()
        await auth.close()
        db.dispose()

    return secured_server(
        SERVICE,
        settings,
        registrations=[
            Registration(
                "aidc.training.v1.TrainingService",
                lambda server: training_service_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server),
            )
        ],
        permissions=PERMISSIONS,
        readiness=ready,
        on_stop=[close],
        address=address,
    )
