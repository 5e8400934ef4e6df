"""The storage service's rows of the authorization matrix (see tests/test_authorization_matrix.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.storage.config import StorageSettings
from tests.conftest import RunningAuth
from tests.matrix_support import ADMINS, PLATFORM, ServiceUnderTest
from tests.storage.conftest import start_storage, storage_env
from tests.storage.seaweed import SeaweedFS

SERVICE = "aidc.storage.v1.StorageService"
DESCRIPTOR = pb.DESCRIPTOR.services_by_name["StorageService"]

_READERS = frozenset({"tenant-admin", "developer", "viewer", "platform-admin"})
_WRITERS = frozenset({"tenant-admin", "developer", "platform-admin"})

# Who may call each RPC on their own tenant (the platform admin acts on every tenant). Insertion order is call
# order: DeleteTenantKeys last, so the other rows run with the tenant's keys intact.
EXPECTED: dict[str, frozenset[str]] = {
    "CreateDataset": _WRITERS,
    "ListDatasets": _READERS,
    "Upload": _WRITERS,
    "Download": _READERS,
    "Stat": _READERS,
    "List": _READERS,
    "Delete": _WRITERS,
    "RotateTenantKey": ADMINS | PLATFORM,
    "DeleteTenantKeys": ADMINS | PLATFORM,
}

TENANT_FREE: set[str] = set()


def build_request(rpc: str, tenant: str) -> Any:
    """A well-formed request naming ``tenant`` (objects that don't exist answer NOT_FOUND, not a denial)."""
    artifact = pb.OBJECT_KIND_ARTIFACT
    requests: dict[str, Callable[[], Any]] = {
        "CreateDataset": lambda: pb.CreateDatasetRequest(tenant=tenant, name="matrix"),
        "ListDatasets": lambda: pb.ListDatasetsRequest(tenant=tenant),
        "Upload": lambda: [
            pb.UploadRequest(header=pb.UploadHeader(tenant=tenant, kind=artifact, name="matrix/report")),
            pb.UploadRequest(chunk=b"hello"),
        ],
        "Download": lambda: pb.DownloadRequest(tenant=tenant, kind=artifact, name="matrix/missing"),
        "Stat": lambda: pb.StatRequest(tenant=tenant, kind=artifact, name="matrix/missing"),
        "List": lambda: pb.ListRequest(tenant=tenant),
        "Delete": lambda: pb.DeleteRequest(tenant=tenant, kind=artifact, name="matrix/missing", version=1),
        "RotateTenantKey": lambda: pb.RotateTenantKeyRequest(tenant=tenant),
        "DeleteTenantKeys": lambda: pb.DeleteTenantKeysRequest(tenant=tenant, confirm_tenant=tenant),
    }
    return requests[rpc]()


@asynccontextmanager
async def serve(auth: RunningAuth, tmp_path: Path) -> AsyncIterator[str]:
    """Starts a real SeaweedFS and the storage service (in this process) next to the running auth."""
    s3 = SeaweedFS(tmp_path / "s3")
    s3.start()
    try:
        settings = StorageSettings.from_env(storage_env(tmp_path / "data", auth.address, s3))
        running = await start_storage(settings, {})
        try:
            yield running.address
        finally:
            await running.server.stop(0)
    finally:
        s3.stop()


UNDER_TEST = ServiceUnderTest(SERVICE, DESCRIPTOR, EXPECTED, TENANT_FREE, build_request, serve)
