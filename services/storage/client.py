"""The typed client of the storage service (the training service, the CLI and tests use it).

``upload`` streams from bytes, a file path or an (async) iterable of chunks; ``download`` is an async iterator
of plaintext chunks; ``download_to`` writes a file only if the whole download succeeded (a DATA_LOSS at the end
of a stream never leaves a wrong file behind). Errors arrive as services.mesh.errors types. A program that moves
large objects should tune its allocator first (``services.mesh.memory.tune_allocator()``, as every service and the
CLI's storage commands do): glibc's own thresholds cost a receiving client about half its CPU in page faults.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path

import grpc

from services.gen.aidc.common.v1 import common_pb2
from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.gen.aidc.storage.v1 import storage_service_pb2_grpc
from services.mesh.client import ServiceClient, translate_rpc_error
from services.mesh.errors import DataLoss
from services.storage.wire import deserialize_download

__all__ = ["StorageClient", "UploadSource", "CHUNK_BYTES"]

#: Size of the chunks the client sends.
CHUNK_BYTES = 1024 * 1024

#: What ``upload`` reads from: the content itself, a file, or chunks.
UploadSource = bytes | bytearray | memoryview | str | os.PathLike[str] | AsyncIterable[bytes] | Iterable[bytes]

Progress = Callable[[int], None]


async def _chunks_of(source: UploadSource, chunk_bytes: int) -> AsyncIterator[bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source)
        for start in range(0, len(view), chunk_bytes):
            yield bytes(view[start : start + chunk_bytes])
    elif isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:  # noqa: ASYNC230 - reads run in a thread below
            while block := await asyncio.to_thread(f.read, chunk_bytes):
                yield block
    elif isinstance(source, AsyncIterable):
        async for block in source:
            yield bytes(block)
    else:
        for block in source:
            yield bytes(block)


def _source_size(source: UploadSource) -> int | None:
    if isinstance(source, bytes | bytearray | memoryview):
        return len(memoryview(source).cast("B"))
    if isinstance(source, str | os.PathLike):
        return os.stat(source).st_size
    return None


class StorageClient(ServiceClient):
    """Typed calls to StorageService."""

    def __init__(self, channel: grpc.aio.Channel, **kwargs: float) -> None:
        super().__init__(channel, **kwargs)  # type: ignore[arg-type]
        self.stub = storage_service_pb2_grpc.StorageServiceStub(channel)
        # Download's chunks are taken out of their messages without protobuf parsing them (services.storage.wire).
        self._download = channel.unary_stream(
            "/aidc.storage.v1.StorageService/Download",
            request_serializer=pb.DownloadRequest.SerializeToString,
            response_deserializer=deserialize_download,
        )

    # -- datasets ----------------------------------------------------------------------------------------

    async def create_dataset(self, tenant: str, name: str, description: str = "") -> pb.Dataset:
        request = pb.CreateDatasetRequest(tenant=tenant, name=name, description=description)
        return (await self._unary(self.stub.CreateDataset, request)).dataset

    async def list_datasets(self, tenant: str, name_prefix: str = "") -> list[pb.Dataset]:
        """Every dataset of the tenant (all pages)."""
        found: list[pb.Dataset] = []
        token = ""
        while True:
            request = pb.ListDatasetsRequest(
                tenant=tenant, name_prefix=name_prefix, page=common_pb2.PageRequest(page_size=1000, page_token=token)
            )
            response = await self._unary(self.stub.ListDatasets, request, idempotent=True)
            found.extend(response.datasets)
            token = response.page.next_page_token
            if not token:
                return found

    # -- objects -----------------------------------------------------------------------------------------

    async def upload(
        self,
        tenant: str,
        name: str,
        source: UploadSource,
        *,
        kind: pb.ObjectKind.ValueType = pb.OBJECT_KIND_DATASET,
        content_type: str = "",
        text_dataset: pb.TextDatasetSpec | None = None,
        masking: pb.MaskingOptions | None = None,
        metadata: Mapping[str, str] | None = None,
        expected_sha256: str = "",
        chunk_bytes: int = CHUNK_BYTES,
        progress: Progress | None = None,
        timeout: float | None = None,
    ) -> pb.ObjectInfo:
        """Uploads a new version of a dataset (which must exist) or an artifact; returns what was stored."""
        header = pb.UploadHeader(
            tenant=tenant,
            kind=kind,
            name=name,
            content_type=content_type,
            text_dataset=text_dataset,
            masking=masking,
            metadata=dict(metadata or {}),
            expected_sha256=expected_sha256,
        )
        size = _source_size(source)
        if size is not None:
            header.expected_size_bytes = size

        async def requests() -> AsyncIterator[pb.UploadRequest]:
            yield pb.UploadRequest(header=header)
            async for block in _chunks_of(source, chunk_bytes):
                yield pb.UploadRequest(chunk=block)
                if progress is not None:
                    progress(len(block))

        response = await self._client_stream(self.stub.Upload, requests(), timeout=timeout)
        return response.object  # type: ignore[no-any-return]

    async def open_download(
        self,
        tenant: str,
        name: str,
        *,
        kind: pb.ObjectKind.ValueType = pb.OBJECT_KIND_DATASET,
        version: int = 0,
        offset: int = 0,
        length: int = 0,
        timeout: float | None = None,
    ) -> tuple[pb.ObjectInfo, AsyncIterator[memoryview]]:
        """The object's metadata and an iterator of its plaintext chunks (the requested range): views of the
        received messages, not copies (``bytes(chunk)`` makes one)."""
        request = pb.DownloadRequest(tenant=tenant, kind=kind, name=name, version=version, offset=offset, length=length)
        call = self._download(request, timeout=timeout)
        try:
            first = await call.read()
        except grpc.RpcError as error:
            raise translate_rpc_error(error) from None
        if not isinstance(first, pb.DownloadResponse) or first.WhichOneof("payload") != "object":
            call.cancel()  # ended (EOF) or began with a chunk
            raise DataLoss("the download did not start with the object's metadata")

        async def chunks() -> AsyncIterator[memoryview]:
            try:
                async for message in call:
                    yield message if isinstance(message, memoryview) else memoryview(message.chunk)
            except grpc.RpcError as error:
                raise translate_rpc_error(error) from None
            finally:
                call.cancel()

        return first.object, chunks()

    async def download(
        self,
        tenant: str,
        name: str,
        *,
        kind: pb.ObjectKind.ValueType = pb.OBJECT_KIND_DATASET,
        version: int = 0,
        offset: int = 0,
        length: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[memoryview]:
        """Plaintext chunks of one version (the latest by default), or of a byte range of it (see open_download)."""
        _, chunks = await self.open_download(
            tenant, name, kind=kind, version=version, offset=offset, length=length, timeout=timeout
        )
        async for chunk in chunks:
            yield chunk

    async def download_bytes(self, tenant: str, name: str, **kwargs: object) -> bytes:
        """The whole content in memory (small objects only)."""
        return b"".join([chunk async for chunk in self.download(tenant, name, **kwargs)])  # type: ignore[arg-type]

    async def download_to(
        self,
        tenant: str,
        name: str,
        path: str | os.PathLike[str],
        *,
        kind: pb.ObjectKind.ValueType = pb.OBJECT_KIND_DATASET,
        version: int = 0,
        progress: Progress | None = None,
        on_start: Callable[[pb.ObjectInfo], None] | None = None,
        timeout: float | None = None,
    ) -> pb.ObjectInfo:
        """Downloads into ``path``, atomically: the file appears only when every byte arrived and verified."""
        target = Path(path)
        info, chunks = await self.open_download(tenant, name, kind=kind, version=version, timeout=timeout)
        if on_start is not None:
            on_start(info)
        fd, temp = tempfile.mkstemp(dir=target.parent or Path("."), prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    await asyncio.to_thread(out.write, chunk)
                    if progress is not None:
                        progress(len(chunk))
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return info

    async def stat(
        self, tenant: str, name: str, *, kind: pb.ObjectKind.ValueType = pb.OBJECT_KIND_DATASET, version: int = 0
    ) -> pb.ObjectInfo:
        request = pb.StatRequest(tenant=tenant, kind=kind, name=name, version=version)
        return (await self._unary(self.stub.Stat, request, idempotent=True)).object

    async def list_objects(
        self,
        tenant: str,
        *,
        kind: pb.ObjectKind.ValueType = pb.OBJECT_KIND_UNSPECIFIED,
        name_prefix: str = "",
        all_versions: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[pb.ObjectInfo], str]:
        """One page of objects and the next page's token ("" after the last page)."""
        request = pb.ListRequest(
            tenant=tenant,
            kind=kind,
            name_prefix=name_prefix,
            all_versions=all_versions,
            page=common_pb2.PageRequest(page_size=page_size, page_token=page_token),
        )
        response = await self._unary(self.stub.List, request, idempotent=True)
        return list(response.objects), response.page.next_page_token

    async def list_all(
        self,
        tenant: str,
        *,
        kind: pb.ObjectKind.ValueType = pb.OBJECT_KIND_UNSPECIFIED,
        name_prefix: str = "",
        all_versions: bool = False,
    ) -> list[pb.ObjectInfo]:
        """Every matching object (all pages)."""
        found: list[pb.ObjectInfo] = []
        token = ""
        while True:
            page, token = await self.list_objects(
                tenant, kind=kind, name_prefix=name_prefix, all_versions=all_versions, page_size=1000, page_token=token
            )
            found.extend(page)
            if not token:
                return found

    async def delete(
        self,
        tenant: str,
        name: str,
        *,
        kind: pb.ObjectKind.ValueType = pb.OBJECT_KIND_DATASET,
        version: int = 0,
        all_versions: bool = False,
    ) -> list[int]:
        """Deletes one version, or all of them (for a dataset: the dataset too); the deleted version numbers."""
        request = pb.DeleteRequest(tenant=tenant, kind=kind, name=name, version=version, all_versions=all_versions)
        return list((await self._unary(self.stub.Delete, request)).deleted_versions)

    # -- keys --------------------------------------------------------------------------------------------

    async def rotate_tenant_key(self, tenant: str) -> pb.RotateTenantKeyResponse:
        request = pb.RotateTenantKeyRequest(tenant=tenant)
        return await self._unary(self.stub.RotateTenantKey, request, timeout=300.0)

    async def delete_tenant_keys(self, tenant: str, confirm_tenant: str) -> pb.DeleteTenantKeysResponse:
        request = pb.DeleteTenantKeysRequest(tenant=tenant, confirm_tenant=confirm_tenant)
        return await self._unary(self.stub.DeleteTenantKeys, request)
