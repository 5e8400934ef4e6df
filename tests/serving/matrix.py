"""The serving service's rows of the authorization matrix (see tests/test_authorization_matrix.py).

ServingService only; the inference gateway decides per model in its own code and is covered by
tests/serving/test_gateway.py. Training, storage and Triton are deliberately not running: an allowed Deploy reaches
the registry and answers UNAVAILABLE for the refused connection (``reach_absent_services``), so the rows test the
serving service's own decisions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from services.gen.aidc.serving.v1 import serving_service_pb2 as pb
from services.serving.config import ServingSettings
from services.serving.server import build_server
from tests.conftest import RunningAuth, free_port
from tests.matrix_support import ServiceUnderTest

SERVICE = "aidc.serving.v1.ServingService"
DESCRIPTOR = pb.DESCRIPTOR.services_by_name["ServingService"]

_READERS = frozenset({"tenant-admin", "developer", "viewer", "platform-admin"})
_WRITERS = frozenset({"tenant-admin", "developer", "platform-admin"})

EXPECTED: dict[str, frozenset[str]] = {
    "Deploy": _WRITERS,
    "Undeploy": _WRITERS,
    "ListDeployments": _READERS,
    "GetDeployment": _READERS,
}

TENANT_FREE: set[str] = set()


def build_request(rpc: str, tenant: str) -> Any:
    """A well-formed request naming ``tenant`` (missing deployments answer NOT_FOUND, not a denial)."""
    requests: dict[str, Callable[[], Any]] = {
        "Deploy": lambda: pb.DeployRequest(tenant=tenant, model="missing", version=1),
        "Undeploy": lambda: pb.UndeployRequest(tenant=tenant, model="missing"),
        "ListDeployments": lambda: pb.ListDeploymentsRequest(tenant=tenant),
        "GetDeployment": lambda: pb.GetDeploymentRequest(tenant=tenant, model="missing"),
    }
    return requests[rpc]()


@asynccontextmanager
async def serve(auth: RunningAuth, tmp_path: Path) -> AsyncIterator[str]:
    """Starts the serving service (in this process) next to the running auth; nothing else is running."""
    unused = lambda: f"127.0.0.1:{free_port()}"  # noqa: E731
    settings = ServingSettings.from_env(
        {
            "AIDC_DATA_DIR": str(tmp_path / "serving-data"),
            "AIDC_AUTH_ADDR": auth.address,
            "AIDC_STORAGE_ADDR": unused(),
            "AIDC_TRAINING_ADDR": unused(),
            "AIDC_BILLING_ADDR": unused(),
            "AIDC_TRITON_GRPC_ADDR": unused(),
            "AIDC_SERVING_ADDR": unused(),
        }
    )
    server = await build_server(settings, settings.serving_addr)
    await server.start()
    try:
        await server.wait_ready()
        yield settings.serving_addr
    finally:
        await server.stop(0)


UNDER_TEST = ServiceUnderTest(
    SERVICE, DESCRIPTOR, EXPECTED, TENANT_FREE, build_request, serve, reach_absent_services=frozenset({"Deploy"})
)
