"""Wiring of the training service: database, base-model catalog and registry, the storage, scheduler and auth
clients, the core, servicer, and the mesh server."""

from __future__ import annotations

import logging
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from services.auth.client import AuthClient
from services.gen.aidc.training.v1 import training_service_pb2_grpc
from services.mesh.channels import service_channel
from services.mesh.db import open_database
from services.mesh.forwarding import LeaderForwarding
from services.mesh.leader import LeaderElection
from services.mesh.metrics import metrics_enabled
from services.mesh.security import secured_server
from services.mesh.server import MeshServer, Registration
from services.scheduler.client import SchedulerClient
from services.storage.client import StorageClient
from services.training.artifacts import StorageArtifacts
from services.training.config import TrainingSettings
from services.training.core.catalog import BaseModelCatalog, shipped_models
from services.training.core.registry import ModelRegistry
from services.training.core.service import JobOptions, TrainingCore
from services.training.delegations import JobDelegations
from services.training.metrics import TrainingMetrics
from services.training.permissions import PERMISSIONS
from services.training.scheduling import SchedulerRuns
from services.training.servicer import TrainingServicer
from services.training.store import MIGRATIONS, TrainingStore

__all__ = ["build_server", "code_version", "SERVICE"]

SERVICE = "training"
_LEADER_ONLY = tuple(
    f"aidc.training.v1.TrainingService/{method}" for method in ("SubmitFineTune", "CancelJob", "RegisterBaseModel")
)

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
    extra_base_models: dict[str, Path] | None = None,
) -> MeshServer:
    db = open_database(settings.database_url_for(SERVICE))
    db.migrate(MIGRATIONS, SERVICE)
    store = TrainingStore(db)
    JobDelegations.check_master_key(settings.master_key(), store.any_job_credential())
    election = LeaderElection.for_service(db, settings, SERVICE)
    storage = StorageClient(service_channel("storage", settings, identity=SERVICE))
    auth = AuthClient(service_channel("auth", settings, identity=SERVICE))
    # Runs are submitted with this service's certificate (the scheduler runs processes only for mesh services)
    # and the submitter's token (the run is theirs).
    scheduler = SchedulerClient(service_channel("scheduler", settings, identity=SERVICE))
    metrics = TrainingMetrics(metrics_enabled(settings))
    metrics.watch(store)
    artifacts = StorageArtifacts(storage)
    registry = ModelRegistry(
        store,
        BaseModelCatalog({**shipped_models(), **(extra_base_models or {})}),
        artifacts,
        settings.base_models_dir,
    )
    core = TrainingCore(
        store,
        registry,
        artifacts,
        SchedulerRuns(scheduler),
        JobOptions(
            jobs_dir=settings.jobs_dir,
            progress_interval_seconds=settings.training_progress_interval_seconds,
            runner_threads=settings.training_runner_threads,
            default_cpu_millicores=settings.training_default_cpu_millicores,
            default_memory_bytes=settings.training_default_memory_bytes,
            default_pool=settings.training_default_pool,
            code_version=code_version(),
            mesh_identity=settings.tls_dir() is not None,
            data_master_key=settings.master_key(),
        ),
        credentials=JobDelegations(auth, settings.master_key(), SERVICE),
        metrics=metrics,
    )
    servicer = TrainingServicer(core, registry)
    # Jobs are followed (output relayed, models published) by the leader; what starts one goes to it.
    election.lead("training-jobs", core.lead)
    forwarding = LeaderForwarding(election, settings, SERVICE, _LEADER_ONLY)

    async def ready() -> bool:
        await election.start()
        return True

    async def close() -> None:
        metrics.close()
        await election.close()
        await forwarding.close()
        await core.close()
        await scheduler.close()
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
        forwarding=forwarding,
    )
