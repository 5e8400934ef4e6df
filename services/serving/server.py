"""Wiring of the serving service: database, registry source (training + storage clients), the live repository,
Triton control, the deployments core and servicer, the inference gateway, and the mesh server carrying both."""

from __future__ import annotations

from services.gen.aidc.serving.v1 import serving_service_pb2_grpc
from services.mesh.channels import service_channel
from services.mesh.db import open_database
from services.mesh.forwarding import LeaderForwarding
from services.mesh.leader import LeaderElection
from services.mesh.security import mesh_security, secured_server
from services.mesh.server import MeshServer, Registration
from services.serving.config import ServingSettings
from services.serving.core.deployments import DeploymentsCore, RolloutOptions
from services.serving.gateway import GATEWAY_PERMISSIONS, build_gateway
from services.serving.permissions import PERMISSIONS
from services.serving.registry import RegistrySource
from services.serving.repository import LiveRepository
from services.serving.routes import Routes
from services.serving.s3mirror import S3RepositoryMirror
from services.serving.servicer import ServingServicer
from services.serving.store import MIGRATIONS, DeploymentStore
from services.serving.triton import TritonControl
from services.storage.client import StorageClient
from services.training.client import TrainingClient

__all__ = ["build_server", "SERVICE"]

SERVICE = "serving"
_LEADER_ONLY = ("aidc.serving.v1.ServingService/Deploy", "aidc.serving.v1.ServingService/Undeploy")


async def build_server(settings: ServingSettings, address: str | None = None) -> MeshServer:
    db = open_database(settings.database_url_for(SERVICE))
    db.migrate(MIGRATIONS, SERVICE)
    election = LeaderElection.for_service(db, settings, SERVICE)
    security = mesh_security(settings, SERVICE)
    routes = Routes()
    source = RegistrySource(
        TrainingClient(service_channel("training", settings, identity=SERVICE)),
        StorageClient(service_channel("storage", settings, identity=SERVICE)),
    )
    access = settings.triton_access()
    triton = TritonControl(access, settings.serving_rollout_timeout_seconds)
    # On a cluster Triton reads the repository from S3: the local directory is then the staging area, mirrored.
    s3 = settings.model_repository_s3
    mirror = S3RepositoryMirror.from_env(s3) if s3 else None
    core = DeploymentsCore(
        DeploymentStore(db),
        source,
        LiveRepository(
            settings.model_repository_path, settings.serving_flavour, settings.serving_python_env, mirror=mirror
        ),
        triton,
        routes,
        RolloutOptions(
            exports_dir=settings.serving_dir / "exports",
            rollout_timeout_seconds=settings.serving_rollout_timeout_seconds,
            reconcile_interval_seconds=settings.serving_reconcile_interval_seconds,
            alias_poll_seconds=settings.serving_alias_poll_seconds,
            route_refresh_seconds=settings.serving_route_refresh_seconds,
        ),
    )
    # Rollouts, undeploys, reconciling and alias following run on the leader; Deploy and Undeploy go to it.
    election.lead("serving-deployments", core.lead)
    forwarding = LeaderForwarding(election, settings, SERVICE, _LEADER_ONLY)
    gateway = build_gateway(settings, routes, security, access)
    servicer = ServingServicer(core)
    # Billing takes usage only from a mesh service's certificate: without certificates (plaintext dev mode) the
    # gateway's usage waits in its outbox until mTLS is configured.
    delivers_usage = settings.tls_dir() is not None

    async def ready() -> bool:
        # Not Triton's readiness: deployments can be listed and changed while Triton is down, and the gateway
        # answers UNAVAILABLE for inference until it is back (ServerReady tells clients which).
        await gateway.start(deliver_usage=delivers_usage)
        if not await core.start():
            return False
        await election.start()
        return True

    async def close() -> None:
        await election.close()
        await forwarding.close()
        await core.close()
        await gateway.close(flush_timeout=settings.shutdown_grace_seconds)
        await triton.close()
        await source.close()
        db.dispose()

    return secured_server(
        SERVICE,
        settings,
        registrations=[
            Registration(
                "aidc.serving.v1.ServingService",
                lambda server: serving_service_pb2_grpc.add_ServingServiceServicer_to_server(servicer, server),
            ),
            gateway.registration(),
        ],
        permissions=PERMISSIONS.merged(GATEWAY_PERMISSIONS),
        readiness=ready,
        on_stop=[close],
        address=address,
        security=security,
        forwarding=forwarding,
    )
