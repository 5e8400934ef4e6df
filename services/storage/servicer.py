"""StorageService RPCs: translation between protobuf messages and StorageCore calls, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from grpc.aio import ServicerContext

from services.gen.aidc.common.v1 import common_pb2
from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.gen.aidc.storage.v1 import storage_service_pb2_grpc
from services.mesh.errors import InvalidArgument
from services.mesh.identity import require_principal
from services.mesh.messages import timestamp
from services.storage.core.model import DatasetRecord, KeyState, VersionRecord
from services.storage.core.names import ObjectKind
from services.storage.core.pii import MaskingMode, MaskingSpec, PiiKind, masking_spec
from services.storage.core.service import DEFAULT_CONTENT_TYPE, Page, StorageCore, UploadSpec
from services.storage.core.textdata import TextFormat, TextSpec
from services.storage.wire import encode_chunk

__all__ = ["StorageServicer"]

_KINDS = {pb.OBJECT_KIND_DATASET: ObjectKind.DATASET, pb.OBJECT_KIND_ARTIFACT: ObjectKind.ARTIFACT}
_KIND_TO_PB = {kind: value for value, kind in _KINDS.items()}
_FORMATS = {pb.DATA_FORMAT_CSV: TextFormat.CSV, pb.DATA_FORMAT_JSONL: TextFormat.JSONL}
_FORMAT_TO_PB = {"opaque": pb.DATA_FORMAT_OPAQUE, "csv": pb.DATA_FORMAT_CSV, "jsonl": pb.DATA_FORMAT_JSONL}
_PII = {
    pb.PII_KIND_EMAIL: PiiKind.EMAIL,
    pb.PII_KIND_PHONE: PiiKind.PHONE,
    pb.PII_KIND_ID_NUMBER: PiiKind.ID_NUMBER,
    pb.PII_KIND_BANK_CARD: PiiKind.BANK_CARD,
}
_PII_BY_NAME = {kind.name: value for value, kind in _PII.items()}
_MODES = {
    pb.MASKING_MODE_UNSPECIFIED: MaskingMode.PLACEHOLDER,
    pb.MASKING_MODE_PLACEHOLDER: MaskingMode.PLACEHOLDER,
    pb.MASKING_MODE_PSEUDONYMIZE: MaskingMode.PSEUDONYMIZE,
}
_MODE_TO_PB = {"placeholder": pb.MASKING_MODE_PLACEHOLDER, "pseudonymize": pb.MASKING_MODE_PSEUDONYMIZE}


def _kind(value: int, required: bool = True) -> ObjectKind | None:
    kind = _KINDS.get(value)  # type: ignore[call-overload]
    if kind is None and (required or value != pb.OBJECT_KIND_UNSPECIFIED):
        raise InvalidArgument("kind must be OBJECT_KIND_DATASET or OBJECT_KIND_ARTIFACT")
    return kind


def _required_kind(value: int) -> ObjectKind:
    kind = _kind(value)
    assert kind is not None
    return kind


def _dataset(d: DatasetRecord) -> pb.Dataset:
    return pb.Dataset(
        tenant=d.tenant,
        name=d.name,
        description=d.description,
        create_time=timestamp(d.created_at),
        latest_version=d.latest_version,
    )


def _object(v: VersionRecord) -> pb.ObjectInfo:
    info = pb.ObjectInfo(
        tenant=v.tenant,
        kind=_KIND_TO_PB[v.kind],
        name=v.name,
        version=v.version,
        size_bytes=v.size_bytes,
        sha256=v.sha256,
        content_type=v.content_type,
        create_time=timestamp(v.created_at),
        created_by=v.created_by,
        format=_FORMAT_TO_PB.get(v.format, pb.DATA_FORMAT_UNSPECIFIED),
        metadata=v.metadata,
        key_id=v.key_id,
        shredded=v.key_state is KeyState.DESTROYED,
    )
    if v.text is not None:
        info.text_dataset.CopyFrom(
            pb.TextDatasetInfo(
                format=_FORMAT_TO_PB[v.text.format],
                text_column=v.text.text_column,
                label_column=v.text.label_column,
                row_count=v.text.row_count,
                labels=[pb.LabelCount(label=label, count=n) for label, n in sorted(v.text.labels.items())],
            )
        )
    if v.masking is not None:
        info.masking.CopyFrom(
            pb.MaskingReport(
                masked_total=v.masking.masked_total,
                rows_affected=v.masking.rows_affected,
                counts=[pb.MaskCount(kind=_PII_BY_NAME[name], count=n) for name, n in v.masking.counts.items()],
                mode=_MODE_TO_PB[v.masking.mode],
                phone_regions=v.masking.phone_regions,
                pseudonym_key_id=v.masking.pseudonym_key_id,
            )
        )
    return info


def _masking(options: pb.MaskingOptions) -> MaskingSpec | None:
    if not options.enabled:
        if options.kinds or options.mode or options.phone_regions:
            raise InvalidArgument("masking options were given but masking.enabled is false: nothing would be masked")
        return None
    unknown = [k for k in options.kinds if k not in _PII]
    if unknown:
        raise InvalidArgument(f"masking.kinds may hold only {', '.join(pb.PiiKind.Name(k) for k in _PII)}")
    kinds = {_PII[k] for k in options.kinds}  # type: ignore[index]
    if PiiKind.ID_NUMBER in kinds:
        kinds.add(PiiKind.BANK_CARD)  # ID_NUMBER covered cards before BANK_CARD existed; clients rely on it
    mode = _MODES.get(options.mode)  # type: ignore[call-overload]
    if mode is None:
        raise InvalidArgument("masking.mode must be MASKING_MODE_PLACEHOLDER or MASKING_MODE_PSEUDONYMIZE")
    return masking_spec(frozenset(kinds), mode, list(options.phone_regions))


def _text_spec(header: pb.UploadHeader) -> TextSpec | None:
    mask = _masking(header.masking)
    if not header.HasField("text_dataset"):
        if mask is not None:
            raise InvalidArgument("masking needs text_dataset (which column holds the text)")
        return None
    spec = header.text_dataset
    text_format = _FORMATS.get(spec.format)  # type: ignore[call-overload]
    if text_format is None:
        raise InvalidArgument("text_dataset.format must be DATA_FORMAT_CSV or DATA_FORMAT_JSONL")
    return TextSpec(text_format, spec.text_column or "text", spec.label_column or "label", mask)


class StorageServicer(storage_service_pb2_grpc.StorageServiceServicer):
    """Each RPC: unpack, call the core, pack."""

    def __init__(self, core: StorageCore) -> None:
        self._core = core

    async def CreateDataset(self, request: pb.CreateDatasetRequest, context: ServicerContext) -> Any:
        principal = require_principal()
        tenant = self._core.tenant_of(principal, request.tenant)
        dataset = await self._core.create_dataset(principal, tenant, request.name, request.description)
        return pb.CreateDatasetResponse(dataset=_dataset(dataset))

    async def ListDatasets(self, request: pb.ListDatasetsRequest, context: ServicerContext) -> Any:
        principal = require_principal()
        tenant = self._core.tenant_of(principal, request.tenant)
        page = Page(request.page.page_size, request.page.page_token)
        found, token = await self._core.list_datasets(principal, tenant, request.name_prefix, page)
        return pb.ListDatasetsResponse(
            datasets=[_dataset(d) for d in found], page=common_pb2.PageResponse(next_page_token=token)
        )

    async def Upload(self, request_iterator: AsyncIterator[pb.UploadRequest], context: ServicerContext) -> Any:
        principal = require_principal()
        messages = request_iterator.__aiter__()
        try:
            first = await messages.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument("empty Upload stream: the first message must carry the header") from None
        if first.WhichOneof("payload") != "header":
            raise InvalidArgument("the first message of an Upload must carry the header")
        header = first.header
        spec = UploadSpec(
            tenant=self._core.tenant_of(principal, header.tenant),
            kind=_required_kind(header.kind),
            name=header.name,
            content_type=header.content_type or DEFAULT_CONTENT_TYPE,
            text=_text_spec(header),
            expected_sha256=header.expected_sha256,
            expected_size=header.expected_size_bytes if header.HasField("expected_size_bytes") else None,
            metadata=dict(header.metadata),
        )

        async def chunks() -> AsyncIterator[bytes]:
            async for message in messages:
                which = message.WhichOneof("payload")
                if which == "header":
                    raise InvalidArgument("only the first message of an Upload may carry a header")
                if which == "chunk":
                    yield message.chunk

        record = await self._core.upload(principal, spec, chunks())
        return pb.UploadResponse(object=_object(record))

    async def Download(self, request: pb.DownloadRequest, context: ServicerContext) -> AsyncIterator[Any]:
        principal = require_principal()
        tenant = self._core.tenant_of(principal, request.tenant)
        download = await self._core.download(
            principal,
            tenant,
            _required_kind(request.kind),
            request.name,
            request.version,
            request.offset,
            request.length,
            frame=encode_chunk,
        )
        yield pb.DownloadResponse(object=_object(download.version))
        async for chunk in download.chunks:
            yield chunk  # encoded DownloadResponses (services.storage.wire)

    async def Stat(self, request: pb.StatRequest, context: ServicerContext) -> Any:
        principal = require_principal()
        tenant = self._core.tenant_of(principal, request.tenant)
        record = await self._core.stat(principal, tenant, _required_kind(request.kind), request.name, request.version)
        return pb.StatResponse(object=_object(record))

    async def List(self, request: pb.ListRequest, context: ServicerContext) -> Any:
        principal = require_principal()
        tenant = self._core.tenant_of(principal, request.tenant)
        found, token = await self._core.list_objects(
            principal,
            tenant,
            _kind(request.kind, required=False),
            request.name_prefix,
            request.all_versions,
            Page(request.page.page_size, request.page.page_token),
        )
        return pb.ListResponse(objects=[_object(v) for v in found], page=common_pb2.PageResponse(next_page_token=token))

    async def Delete(self, request: pb.DeleteRequest, context: ServicerContext) -> Any:
        principal = require_principal()
        tenant = self._core.tenant_of(principal, request.tenant)
        deleted = await self._core.delete(
            principal, tenant, _required_kind(request.kind), request.name, request.version, request.all_versions
        )
        return pb.DeleteResponse(deleted_versions=deleted)

    async def RotateTenantKey(self, request: pb.RotateTenantKeyRequest, context: ServicerContext) -> Any:
        tenant = self._core.tenant_of(require_principal(), request.tenant)
        key_id, rewrapped = await self._core.rotate_tenant_key(tenant)
        return pb.RotateTenantKeyResponse(key_id=key_id, rewrapped_objects=rewrapped)

    async def DeleteTenantKeys(self, request: pb.DeleteTenantKeysRequest, context: ServicerContext) -> Any:
        tenant = self._core.tenant_of(require_principal(), request.tenant)
        destroyed, shredded = await self._core.delete_tenant_keys(tenant, request.confirm_tenant)
        return pb.DeleteTenantKeysResponse(destroyed_keys=destroyed, shredded_objects=shredded)
