"""The training service's side of the storage service: datasets in, base-model archives in, exports out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from services.gen.aidc.storage.v1 import storage_service_pb2 as storage_pb
from services.mesh.errors import DataLoss, InvalidArgument
from services.mesh.files import sha256_file
from services.storage.client import StorageClient
from services.training.core.model import ArtifactEntry, DatasetVersion

__all__ = ["StorageArtifacts"]

_FORMATS = {storage_pb.DATA_FORMAT_CSV: "csv", storage_pb.DATA_FORMAT_JSONL: "jsonl"}


class StorageArtifacts:
    """ArtifactGateway over a StorageClient whose channel forwards the caller's token (create_channel)."""

    def __init__(self, client: StorageClient, transfer_timeout_seconds: float = 600.0) -> None:
        self._client = client
        self._timeout = transfer_timeout_seconds

    async def fetch_dataset(
        self, tenant: str, name: str, version: int, write: Callable[[memoryview], None]
    ) -> tuple[DatasetVersion, str]:
        info, chunks = await self._client.open_download(tenant, name, version=version, timeout=self._timeout)
        head = b""
        async for chunk in chunks:
            head = head or bytes(chunk[:1])
            await asyncio.to_thread(write, chunk)
        fmt = _FORMATS.get(info.format) or _FORMATS.get(info.text_dataset.format)
        if fmt is None:
            fmt = "jsonl" if head == b"{" else "csv"
        if info.shredded:
            raise InvalidArgument(f"dataset {name!r} version {info.version} was crypto-shredded")
        return DatasetVersion(name, info.version, info.sha256, info.size_bytes, info.text_dataset.row_count), fmt

    async def fetch_artifact(self, tenant: str, name: str, version: int, target: Path) -> ArtifactEntry:
        info = await self._client.download_to(
            tenant, name, target, kind=storage_pb.OBJECT_KIND_ARTIFACT, version=version, timeout=self._timeout
        )
        return ArtifactEntry("artifact", info.name, info.version, info.size_bytes, info.sha256)

    async def put_artifact(self, tenant: str, name: str, source: Path, role: str) -> ArtifactEntry:
        """Uploads ``source`` as a new version of artifact ``name``; the entry pins that version and the SHA-256 of
        the file as training wrote it (storage refuses the upload if the bytes it received differ)."""
        digest = await asyncio.to_thread(sha256_file, source)
        info = await self._client.upload(
            tenant,
            name,
            source,
            kind=storage_pb.OBJECT_KIND_ARTIFACT,
            metadata={"producer": "training", "role": role},
            expected_sha256=digest,
            timeout=self._timeout,
        )
        if info.sha256 != digest:
            raise DataLoss(f"storage recorded SHA-256 {info.sha256} for {name!r}, training wrote {digest}")
        return ArtifactEntry(role, info.name, info.version, info.size_bytes, digest)
