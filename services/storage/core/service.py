"""The storage service's domain: datasets and artifacts of tenants, sealed before they reach the object store,
streamed in bounded memory both ways, versioned, checked, re-keyed and crypto-shredded.

The stages of a transfer overlap: an upload receives the next blocks from the network on the event loop while a
worker thread checks (and masks) text datasets, hashes and seals the previous ones into whole parts
(core.sealing), and up to ``parallel_parts`` parts travel to the object store at once (core.parts); only when the
whole object is in the store, its size checked and its data key wrapped does a single database transaction make
the version visible. A download reads from the store only the segments its range covers, in a worker thread a
few segments ahead of gRPC (core.reading, core.prefetch): each segment is authenticated (bound to the object, its
index and whether it is the last) before any of its plaintext is released, so a download that ends without an
error released exactly the bytes whose size and SHA-256 the upload recorded.
Memory is bounded per transfer by the part buffers in flight, whatever the object's size.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from services.mesh.authz import PermissionChecker
from services.mesh.errors import (
    Aborted,
    AidcError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.mesh.identity import Principal
from services.mesh.segments import AES_GCM_HKDF, CipherSuite
from services.storage.core.crypto import DataKey, KeyDestroyed, KeyManager, content_aad, data_key_context
from services.storage.core.model import (
    DatasetRecord,
    KeyState,
    MaskingRecord,
    PendingUpload,
    TextDatasetRecord,
    VersionRecord,
)
from services.storage.core.names import MAX_NAME_BYTES, ObjectKind, object_key, validate_object_name, validate_tenant
from services.storage.core.parts import PartUploader
from services.storage.core.pii import MaskingMode
from services.storage.core.prefetch import prefetched
from services.storage.core.reading import ByteRange, StoredContent, read_plaintext
from services.storage.core.sealing import DEFAULT_CONTENT_TYPE, SealingWriter, UploadSpec
from services.storage.core.tenantkeys import TenantKeys
from services.storage.core.usage import NoUsageSink, StorageUsage, UsageKind, UsageSink
from services.storage.objectstore import ObjectStore
from services.storage.store import DatasetGone, KeyUnusable, StorageStore, UploadGone, VersionTaken

__all__ = ["StorageCore", "TransferLimits", "UploadSpec", "Download", "Page", "DEFAULT_CONTENT_TYPE"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_METADATA_ENTRIES = 32
_MAX_METADATA_BYTES = 256
_MAX_DESCRIPTION = 1000
_DEFAULT_PAGE, _MAX_PAGE = 50, 1000
#: Plaintext handed to the sealing thread at a time (chunks from the wire are gathered up to this).
_WRITE_BLOCK = 1024 * 1024
#: Segments opened into each piece of a download, and so each gRPC message (~3 MiB): a third of the per-message
#: work (hand-over, interceptors, framing, the client's async iteration) of one segment per message; under the
#: 4 MiB that gRPC clients accept by default, and under the allocator's mmap threshold (services.mesh.memory).
_PIECE_SEGMENTS = 3
#: Pieces a download reads ahead of what gRPC has taken (6 segments).
_READ_AHEAD = 2
_COMMIT_ATTEMPTS = 8


@dataclass(frozen=True)
class TransferLimits:
    """Sizes that bound each transfer's memory, and how many transfers run at once."""

    part_bytes: int = 8 * 1024 * 1024
    parallel_parts: int = 3
    max_object_bytes: int = 1024**4
    max_concurrent_transfers: int = 16
    verify_uploads: bool = False
    orphan_grace: timedelta = timedelta(hours=1)


@dataclass(frozen=True)
class Download:
    """What a download returns: the version it reads and its plaintext (the requested range) in chunks."""

    version: VersionRecord
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True)
class Page:
    size: int = _DEFAULT_PAGE
    token: str = ""


def _check_prefix(prefix: str) -> None:
    """A name prefix no name can have is refused before it reaches the database (whose LIKE patterns are bounded:
    SQLite fails a 50,000-byte one as "too complex")."""
    if len(prefix.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidArgument(f"name_prefix is longer than {MAX_NAME_BYTES} bytes (the longest name)")


def _page_size(size: int) -> int:
    if size < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(size or _DEFAULT_PAGE, _MAX_PAGE)


def _encode_token(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


def _decode_token(token: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error):
        raise InvalidArgument("malformed page_token") from None


def _resource(kind: ObjectKind) -> str:
    return kind.value  # "datasets" / "artifacts", the resources of the role table


class StorageCore:
    """Every storage operation; callers pass the authenticated principal, the core authorizes per object kind."""

    def __init__(
        self,
        store: StorageStore,
        objects: ObjectStore,
        keys: KeyManager,
        checker: PermissionChecker,
        *,
        limits: TransferLimits | None = None,
        usage: UsageSink | None = None,
        instance_id: str | None = None,
        cipher_suite: CipherSuite = AES_GCM_HKDF,
    ) -> None:
        self._store = store
        self._objects = objects
        self._keys = keys
        self._checker = checker
        self._limits = limits or TransferLimits()
        self._usage = usage or NoUsageSink()
        self.instance_id = instance_id or uuid.uuid4().hex
        self._transfers = asyncio.Semaphore(self._limits.max_concurrent_transfers)
        self._suite = cipher_suite
        # Transfer work blocks on sockets: its own threads, so it never starves database calls; parts have theirs,
        # so a writer waiting for room among its parts never holds a thread a part needs.
        self._executor = ThreadPoolExecutor(
            max_workers=self._limits.max_concurrent_transfers + 4, thread_name_prefix="storage-transfer"
        )
        self._part_executor = ThreadPoolExecutor(
            max_workers=self._limits.max_concurrent_transfers * self._limits.parallel_parts,
            thread_name_prefix="storage-part",
        )
        self._tenant_keys = TenantKeys(store, keys)
        self._background: set[asyncio.Task[None]] = set()
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> bool:
        """Readiness: the bucket exists (created if missing); then, once, clean up after stopped instances."""
        await self._io(self._objects.ensure_bucket)
        if not self._started:
            self._started = True
            await self._tenant_keys.reconcile_destroyed()
            await self.clean_orphans()
        return True

    async def close(self) -> None:
        for task in list(self._background):
            await asyncio.wait([task], timeout=5)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._part_executor.shutdown(wait=False, cancel_futures=True)

    async def _io(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _db(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await self._store.db.run(fn, *args)

    async def clean_orphans(self) -> int:
        """Removes the stored bytes of uploads that stopped instances left unfinished (older than the grace
        period) and of deleted versions whose removal failed earlier. Returns how many were cleaned."""
        cutoff = datetime.now(UTC) - self._limits.orphan_grace
        cleaned = 0
        for pending in await self._db(self._store.stale_pending, self.instance_id, cutoff):
            try:
                await self._io(self._objects.abort_incomplete_uploads, pending.s3_key)
                await self._io(self._objects.remove, pending.s3_key)
            except AidcError as exc:
                log.warning("could not clean %s yet: %s", pending.s3_key, exc.message)
                continue
            await self._db(self._store.remove_pending, pending.object_id)
            cleaned += 1
        if cleaned:
            log.info("cleaned %d orphaned objects from the object store", cleaned)
        return cleaned

    # -- authorization -----------------------------------------------------------------------------------

    @staticmethod
    def tenant_of(principal: Principal, tenant: str) -> str:
        """The tenant a request acts on: the one it names, else the caller's own."""
        return validate_tenant(tenant or principal.tenant)

    async def _allowed(self, principal: Principal, tenant: str, resource: str, action: str) -> bool:
        return await self._checker.check(principal, tenant, resource, action)

    async def _authorize(self, principal: Principal, tenant: str, kind: ObjectKind, action: str) -> None:
        # Checked before anything is looked up, so a caller without access learns nothing about what exists.
        if not await self._allowed(principal, tenant, _resource(kind), action):
            raise PermissionDenied(f"{principal.subject} may not {action} {_resource(kind)} in tenant {tenant!r}")

    # -- datasets ----------------------------------------------------------------------------------------

    async def create_dataset(self, principal: Principal, tenant: str, name: str, description: str) -> DatasetRecord:
        validate_object_name(name, ObjectKind.DATASET)
        if len(description) > _MAX_DESCRIPTION or _CONTROL.search(description.replace("\n", "")):
            raise InvalidArgument(f"description must be at most {_MAX_DESCRIPTION} printable characters")
        record = DatasetRecord(tenant, name, description, datetime.now(UTC), principal.subject)
        await self._db(self._store.create_dataset, record)
        return record

    async def list_datasets(
        self, principal: Principal, tenant: str, prefix: str, page: Page
    ) -> tuple[list[DatasetRecord], str]:
        _check_prefix(prefix)
        size = _page_size(page.size)
        after = str(_decode_token(page.token)) if page.token else ""
        found = await self._db(self._store.datasets, tenant, prefix, after, size + 1)
        more = len(found) > size
        found = found[:size]
        return found, _encode_token(found[-1].name) if more else ""

    # -- upload ------------------------------------------------------------------------------------------

    def _check_spec(self, spec: UploadSpec) -> None:
        validate_object_name(spec.name, spec.kind)
        if not spec.content_type or len(spec.content_type) > 200 or _CONTROL.search(spec.content_type):
            raise InvalidArgument("content_type must be 1-200 printable characters")
        if spec.expected_sha256 and not _SHA256.match(spec.expected_sha256):
            raise InvalidArgument("expected_sha256 must be 64 lowercase hex digits")
        if spec.expected_size is not None and not 0 <= spec.expected_size <= self._limits.max_object_bytes:
            raise InvalidArgument(f"expected_size_bytes must be between 0 and {self._limits.max_object_bytes}")
        if len(spec.metadata) > _MAX_METADATA_ENTRIES:
            raise InvalidArgument(f"at most {_MAX_METADATA_ENTRIES} metadata entries")
        for key, value in spec.metadata.items():
            if not key or len(key.encode()) > _MAX_METADATA_BYTES or len(value.encode()) > _MAX_METADATA_BYTES:
                raise InvalidArgument(f"metadata keys must be 1-{_MAX_METADATA_BYTES} bytes, values at most as long")
            if _CONTROL.search(key):
                raise InvalidArgument("metadata keys must not contain control characters")
        if spec.text is not None:
            for column in (spec.text.text_column, spec.text.label_column):
                if not column or len(column) > 256 or _CONTROL.search(column):
                    raise InvalidArgument("text and label column names must be 1-256 printable characters")
            if spec.text.text_column == spec.text.label_column:
                raise InvalidArgument("the text and label columns must differ")

    async def upload(self, principal: Principal, spec: UploadSpec, chunks: AsyncIterator[bytes]) -> VersionRecord:
        """Stores one new version from a stream of plaintext chunks; visible only once everything succeeded."""
        self._check_spec(spec)
        await self._authorize(principal, spec.tenant, spec.kind, "write")
        if spec.kind is ObjectKind.DATASET and not await self._db(self._store.dataset_exists, spec.tenant, spec.name):
            raise NotFound(f"dataset {spec.name!r} does not exist (create it first)")
        async with self._transfers:
            return await self._upload(principal, spec, chunks)

    async def _upload(self, principal: Principal, spec: UploadSpec, chunks: AsyncIterator[bytes]) -> VersionRecord:
        pseudonymizer = None
        if spec.text is not None and spec.text.mask is not None and spec.text.mask.mode is MaskingMode.PSEUDONYMIZE:
            pseudonymizer = await self._tenant_keys.pseudonymizer(spec.tenant)
        object_id = uuid.uuid4().hex
        s3_key = object_key(spec.tenant, spec.kind, spec.name, object_id)
        await self._db(
            self._store.add_pending,
            PendingUpload(object_id, spec.tenant, s3_key, self.instance_id, datetime.now(UTC)),
        )
        data_key = DataKey.generate()
        stream_key = data_key.stream_key()
        aad = content_aad(spec.tenant, spec.kind.value, spec.name, object_id)
        limits = self._limits
        parts = PartUploader(self._objects, s3_key, spec.content_type, self._part_executor, limits.parallel_parts)
        loop = asyncio.get_running_loop()
        sealing: asyncio.Future[Any] | None = None
        try:
            writer = SealingWriter(
                spec,
                self._suite.new(stream_key.key, aad),
                stream_key.layout,
                parts,
                limits.part_bytes,
                limits.max_object_bytes,
                pseudonymizer,
            )
            # The next chunks arrive from the network while the writer seals the previous block.
            block: list[bytes] = []
            gathered = 0
            async for chunk in chunks:
                block.append(chunk)
                gathered += len(chunk)
                if gathered >= _WRITE_BLOCK:
                    if sealing is not None:
                        await sealing
                    sealing = loop.run_in_executor(self._executor, writer.write, block)
                    block, gathered = [], 0
            if sealing is not None:
                await sealing
            sealing = loop.run_in_executor(self._executor, writer.write, block)
            await sealing
            sealing = loop.run_in_executor(self._executor, writer.finish)
            stored_bytes = await sealing
            sealing = None
            in_store = await self._io(self._objects.size_of, s3_key)
            if in_store != stored_bytes:
                raise DataLoss(f"the object store holds {in_store} bytes of the upload, {stored_bytes} were sent")
            content = StoredContent(s3_key, stored_bytes, writer.size, writer.sha.hexdigest())
            if limits.verify_uploads:
                await self._verify(content, data_key, aad)
            text, masking = writer.text_summary()
            record = await self._commit(principal, spec, object_id, data_key, content, text, masking)
        except BaseException:
            parts.stop()
            self._spawn(self._discard(object_id, s3_key, parts, sealing))
            raise
        await self._report(spec.tenant, UsageKind.STORED, record.stored_bytes, record.object_id)
        log.info(
            "stored %s %s/%s v%d (%d bytes)", spec.kind.value, spec.tenant, spec.name, record.version, record.size_bytes
        )
        return record

    async def _commit(
        self,
        principal: Principal,
        spec: UploadSpec,
        object_id: str,
        data_key: DataKey,
        content: StoredContent,
        text: TextDatasetRecord | None,
        masking: MaskingRecord | None,
    ) -> VersionRecord:
        """Wraps the data key for the next version number and makes the version visible (retrying when a
        concurrent upload took the number, or a key rotation retired the key)."""
        serialized = data_key.serialize()
        for _ in range(_COMMIT_ATTEMPTS):
            key_id = await self._active_key(spec.tenant)
            version = await self._db(self._store.next_version, spec.tenant, spec.kind, spec.name)
            context = data_key_context(spec.tenant, spec.kind.value, spec.name, version, object_id, content.s3_key)
            record = VersionRecord(
                object_id=object_id,
                tenant=spec.tenant,
                kind=spec.kind,
                name=spec.name,
                version=version,
                s3_key=content.s3_key,
                size_bytes=content.size_bytes,
                stored_bytes=content.stored_bytes,
                sha256=content.sha256,
                content_type=spec.content_type,
                created_at=datetime.now(UTC),
                created_by=principal.subject,
                format=spec.text.format.value if spec.text is not None else "opaque",
                key_id=key_id,
                wrapped_key=await self._keys.wrap(spec.tenant, key_id, serialized, context),
                text=text,
                masking=masking,
                metadata=dict(spec.metadata),
            )
            try:
                await self._db(self._store.commit_version, record)
                return record
            except (VersionTaken, KeyUnusable):
                continue
            except UploadGone:
                raise Aborted("the upload took too long and was cleaned up; upload again") from None
            except DatasetGone:
                raise NotFound(f"dataset {spec.name!r} was deleted during the upload") from None
        raise Aborted("too many concurrent uploads of this object; retry")

    async def _active_key(self, tenant: str) -> str:
        return await self._tenant_keys.active(tenant)

    async def _verify(self, content: StoredContent, data_key: DataKey, aad: bytes) -> None:
        """Reads the stored object back whole: DataLoss unless it opens to the recorded size and SHA-256."""
        whole = ByteRange(0, content.size_bytes)
        async for _ in self._plaintext(content, data_key, aad, whole, len, check_sha256=True):  # nothing kept
            pass

    async def _plaintext(
        self,
        content: StoredContent,
        data_key: DataKey,
        aad: bytes,
        wanted: ByteRange,
        frame: Callable[[memoryview], _T],
        check_sha256: bool = False,
    ) -> AsyncGenerator[tuple[int, _T], None]:
        """(size, frame(piece)) of each plaintext piece of ``wanted``, read, opened and framed in a worker thread."""
        key = data_key.stream_key()

        def produce() -> Iterator[tuple[int, _T]]:
            pieces = read_plaintext(
                self._objects, content, key, self._suite, aad, wanted, check_sha256, _PIECE_SEGMENTS
            )
            for piece in pieces:
                yield len(piece), frame(piece)

        layout = key.layout
        if layout.segment_at(max(wanted.end - 1, wanted.start)) == layout.segment_at(wanted.start):
            # One segment (a small object, or a short range): read in one go, no read-ahead thread to hand over.
            for item in await self._io(lambda: list(produce())):
                yield item
            return
        async with aclosing(prefetched(produce, self._executor, _READ_AHEAD)) as items:
            async for item in items:
                yield item

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _discard(
        self, object_id: str, s3_key: str, parts: PartUploader, sealing: asyncio.Future[Any] | None
    ) -> None:
        """After a failed upload: wait for the writer to stop, abort the multipart upload, remove whatever was
        stored, forget the pending record. Whatever fails here is left to the orphan clean-up."""
        try:
            if sealing is not None:
                await asyncio.wait([sealing], timeout=60)
                if sealing.done() and not sealing.cancelled():
                    sealing.exception()  # retrieved: the failure was reported by the upload itself
            await self._io(parts.abort)
            await self._io(self._objects.remove, s3_key)
            await self._db(self._store.remove_pending, object_id)
        except Exception as exc:  # noqa: BLE001 - best effort; the orphan sweep retries
            log.info("left %s for the orphan clean-up: %s", s3_key, exc)

    # -- download ----------------------------------------------------------------------------------------

    async def stat(self, principal: Principal, tenant: str, kind: ObjectKind, name: str, version: int) -> VersionRecord:
        validate_object_name(name, kind)
        await self._authorize(principal, tenant, kind, "read")
        return await self._find(tenant, kind, name, version)

    async def _find(self, tenant: str, kind: ObjectKind, name: str, version: int) -> VersionRecord:
        if version < 0:
            raise InvalidArgument("version must not be negative")
        record = await self._db(self._store.version, tenant, kind, name, version)
        if record is None:
            which = f"version {version} of " if version else ""
            raise NotFound(f"{which}{kind.value[:-1]} {name!r} not found")
        return record

    async def download(
        self,
        principal: Principal,
        tenant: str,
        kind: ObjectKind,
        name: str,
        version: int,
        offset: int,
        length: int,
        frame: Callable[[memoryview], bytes] = bytes,
    ) -> Download:
        """Opens one version for reading; the chunks hold bytes [offset, offset+length) (to the end for 0), each
        passed through ``frame`` in the reading thread (the servicer encodes its messages there, off the event
        loop)."""
        validate_object_name(name, kind)
        await self._authorize(principal, tenant, kind, "read")
        if offset < 0 or length < 0:
            raise InvalidArgument("offset and length must not be negative")
        record = await self._find(tenant, kind, name, version)
        if offset > record.size_bytes or (offset == record.size_bytes and record.size_bytes > 0):
            raise InvalidArgument(f"offset {offset} is past the end of the object ({record.size_bytes} bytes)")
        data_key = await self._open_data_key(record)
        end = record.size_bytes if length == 0 else min(record.size_bytes, offset + length)
        return Download(record, self._stream(record, data_key, ByteRange(offset, end), frame))

    async def _open_data_key(self, record: VersionRecord) -> DataKey:
        if record.key_state is KeyState.DESTROYED:
            raise _shredded(record)
        context = data_key_context(
            record.tenant, record.kind.value, record.name, record.version, record.object_id, record.s3_key
        )
        try:
            plain = await self._keys.unwrap(record.tenant, record.key_id, record.wrapped_key, context)
        except KeyDestroyed:
            raise _shredded(record) from None
        return DataKey.parse(plain)

    async def _stream(
        self, record: VersionRecord, data_key: DataKey, wanted: ByteRange, frame: Callable[[memoryview], bytes]
    ) -> AsyncIterator[bytes]:
        sent = 0
        aad = content_aad(record.tenant, record.kind.value, record.name, record.object_id)
        content = StoredContent(record.s3_key, record.stored_bytes, record.size_bytes, record.sha256)
        async with self._transfers:
            async with aclosing(self._plaintext(content, data_key, aad, wanted, frame)) as pieces:
                async for size, piece in pieces:
                    sent += size
                    yield piece
        await self._report(record.tenant, UsageKind.DOWNLOADED, sent, record.object_id)

    # -- listing -----------------------------------------------------------------------------------------

    async def list_objects(
        self,
        principal: Principal,
        tenant: str,
        kind: ObjectKind | None,
        prefix: str,
        all_versions: bool,
        page: Page,
    ) -> tuple[list[VersionRecord], str]:
        kinds = [kind] if kind is not None else list(ObjectKind)
        readable = [k for k in kinds if await self._allowed(principal, tenant, _resource(k), "read")]
        if not readable:
            raise PermissionDenied(f"{principal.subject} may not read objects in tenant {tenant!r}")
        _check_prefix(prefix)
        size = _page_size(page.size)
        after = None
        if page.token:
            value = _decode_token(page.token)
            if not (isinstance(value, list) and len(value) == 3):
                raise InvalidArgument("malformed page_token")
            after = (str(value[0]), str(value[1]), int(value[2]))
        only = readable[0] if len(readable) == 1 else None
        found = await self._db(self._store.versions, tenant, only, prefix, all_versions, after, size + 1)
        more = len(found) > size
        found = found[:size]
        token = _encode_token([found[-1].kind.value, found[-1].name, found[-1].version]) if more else ""
        return found, token

    # -- delete ------------------------------------------------------------------------------------------

    async def delete(
        self, principal: Principal, tenant: str, kind: ObjectKind, name: str, version: int, all_versions: bool
    ) -> list[int]:
        """Deletes one version, or every version (and a dataset itself); returns the deleted version numbers."""
        validate_object_name(name, kind)
        await self._authorize(principal, tenant, kind, "delete")
        if all_versions == (version != 0):
            raise InvalidArgument("give either a version or all_versions")
        if all_versions:
            victims = await self._db(self._store.versions_of, tenant, kind, name)
            is_dataset = kind is ObjectKind.DATASET and await self._db(self._store.dataset_exists, tenant, name)
            if not victims and not is_dataset:
                raise NotFound(f"{kind.value[:-1]} {name!r} not found")
            await self._db(self._store.delete_versions, victims, (tenant, name) if is_dataset else None)
        else:
            victims = [await self._find(tenant, kind, name, version)]
            await self._db(self._store.delete_versions, victims, None)
        for victim in victims:
            try:
                await self._io(self._objects.remove, victim.s3_key)
                await self._db(self._store.remove_pending, victim.object_id)
            except Unavailable as exc:
                log.warning("stored bytes of %s left for the orphan clean-up: %s", victim.s3_key, exc.message)
            await self._report(tenant, UsageKind.DELETED, victim.stored_bytes, victim.object_id)
        return [v.version for v in victims]

    # -- keys --------------------------------------------------------------------------------------------

    async def rotate_tenant_key(self, tenant: str) -> tuple[str, int]:
        """A new active tenant key; every data key and the pseudonym key re-wrapped with it (see TenantKeys)."""
        return await self._tenant_keys.rotate(tenant)

    async def delete_tenant_keys(self, tenant: str, confirm_tenant: str) -> tuple[int, int]:
        """Crypto-shreds the tenant (see TenantKeys). Returns (keys destroyed, versions shredded)."""
        return await self._tenant_keys.destroy_all(tenant, confirm_tenant)

    # -- usage -------------------------------------------------------------------------------------------

    async def _report(self, tenant: str, kind: UsageKind, size: int, object_id: str) -> None:
        try:
            # A download leaves the volume as it is: no query of it on the read path.
            total = None if kind is UsageKind.DOWNLOADED else await self._db(self._store.stored_bytes, tenant)
            event = StorageUsage(
                f"{object_id}:{kind.value}:{uuid.uuid4().hex[:8]}", tenant, kind, size, total, datetime.now(UTC)
            )
            await self._usage.record(event)
        except Exception:  # noqa: BLE001 - usage reporting never fails a storage call
            log.warning("could not report usage", exc_info=True)


def _shredded(record: VersionRecord) -> FailedPrecondition:
    return FailedPrecondition(
        f"{record.kind.value[:-1]} {record.name!r} v{record.version} was crypto-shredded: its tenant key was "
        "destroyed and the content can never be decrypted again (delete it to remove the record)"
    )
