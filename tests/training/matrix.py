"""The training service's rows of the authorization matrix (see tests/test_authorization_matrix.py).

Storage and the scheduler are deliberately not running: allowed calls of the RPCs that reach storage answer UNAVAILABLE
for the refused connection (``reach_absent_services``), the others NOT_FOUND or OK, so the rows test the training
service's own decisions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from services.gen.aidc.training.v1 import training_service_pb2 as pb
from services.training.config import TrainingSettings
from services.training.server import build_server
from tests.conftest import RunningAuth, free_port
from tests.matrix_support import ServiceUnderTest

SERVICE = "aidc.training.v1.TrainingService"
DESCRIPTOR = pb.DESCRIPTOR.services_by_name["TrainingService"]

_READERS = frozenset({"tenant-admin", "developer", "viewer", "platform-admin"})
_WRITERS = frozenset({"tenant-admin", "developer", "platform-admin"})

EXPECTED: dict[str, frozenset[str]] = {
    "SubmitFineTune": _WRITERS,
    "GetJob": _READERS,
    "WatchJob": _READERS,
    "CancelJob": _WRITERS,
    "ListJobs": _READERS,
    "ListModels": _READERS,
    "ListModelVersions": _READERS,
    "GetModelVersion": _READERS,
    "SetAlias": _WRITERS,
    "RegisterBaseModel": _WRITERS,
    "ListBaseModels": _READERS,
}

TENANT_FREE: set[str] = set()


def build_request(rpc: str, tenant: str) -> Any:
    """A well-formed request naming ``tenant`` (missing jobs and models answer NOT_FOUND, not a denial)."""
    spec = pb.FineTuneSpec(
        base_model="minilm-l6",
        dataset=pb.DatasetRef(name="matrix"),
        sequence_classification=pb.SequenceClassificationTask(),
        output_model="matrix",
    )
    requests: dict[str, Callable[[], Any]] = {
        "SubmitFineTune": lambda: pb.SubmitFineTuneRequest(tenant=tenant, spec=spec),
        "GetJob": lambda: pb.GetJobRequest(tenant=tenant, job_id="missing"),
        "WatchJob": lambda: pb.WatchJobRequest(tenant=tenant, job_id="missing"),
        "CancelJob": lambda: pb.CancelJobRequest(tenant=tenant, job_id="missing"),
        "ListJobs": lambda: pb.ListJobsRequest(tenant=tenant),
        "ListModels": lambda: pb.ListModelsRequest(tenant=tenant),
        "ListModelVersions": lambda: pb.ListModelVersionsRequest(tenant=tenant, model="missing"),
        "GetModelVersion": lambda: pb.GetModelVersionRequest(tenant=tenant, model="missing"),
        "SetAlias": lambda: pb.SetAliasRequest(tenant=tenant, model="missing", alias="production", version=1),
        "RegisterBaseModel": lambda: pb.RegisterBaseModelRequest(
            tenant=tenant, name="matrix-base", artifact_name="matrix/missing.tar"
        ),
        "ListBaseModels": lambda: pb.ListBaseModelsRequest(tenant=tenant),
    }
    return requests[rpc]()


@asynccontextmanager
async def serve(auth: RunningAuth, tmp_path: Path) -> AsyncIterator[str]:
    """Starts the training service (in this process) next to the running auth; storage's and the scheduler's
    addresses have no server."""
    settings = TrainingSettings.from_env(
        {
            "AIDC_DATA_DIR": str(tmp_path / "training-data"),
            "AIDC_AUTH_ADDR": auth.address,
            "AIDC_STORAGE_ADDR": f"127.0.0.1:{free_port()}",
            "AIDC_SCHEDULER_ADDR": f"127.0.0.1:{free_port()}",
            "AIDC_TRAINING_ADDR": f"127.0.0.1:{free_port()}",
        }
    )
    server = await build_server(settings, settings.training_addr)
    await server.start()
    try:
        await server.wait_ready()
        yield settings.training_addr
    finally:
        await server.stop(0)


#: What reaches storage (the dataset, the base model's artifact), which the matrix does not run.
REACH_STORAGE = frozenset({"SubmitFineTune", "RegisterBaseModel"})

UNDER_TEST = ServiceUnderTest(
    SERVICE, DESCRIPTOR, EXPECTED, TENANT_FREE, build_request, serve, reach_absent_services=REACH_STORAGE
)
