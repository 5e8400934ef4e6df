"""The storage service's domain: datasets and artifacts of tenants, sealed before they reach the object store,
streamed in bounded memory both ways, versioned, checked, re-keyed and crypto-shredded.

An upload streams through ``plaintext -> (text checks, masking) -> SHA-256 -> Tink encrypting stream ->
bounded pipe -> S3 multipart upload`` (the last step in its own thread); only when the whole object is in the
store, its size checked and its data key wrapped does a single database transaction make the version visible.
A download streams ``S3 -> Tink decrypting stream -> SHA-256 -> caller``: each 1 MiB segment is authenticated
before any of its plaintext is released, and the whole-object SHA-256 is checked at the end.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, TypeVar

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
from services.storage.core.crypto import DataKey, KeyDestroyed, KeyManager, TinkError, content_aad, data_key_context
from services.storage.core.model import (
    DatasetRecord,
    KeyState,
    MaskingRecord,
    PendingUpload,
    TextDatasetRecord,
    VersionRecord,
)
from services.storage.core.names import MAX_NAME_BYTES, ObjectKind, object_key, validate_object_name, validate_tenant
from services.storage.core.pii import MaskingMode
from services.storage.core.pipe import BoundedPipe, PipeAborted, PipeReader
from services.storage.core.sealing import DEFAULT_CONTENT_TYPE, SealingWriter, UploadSpec
from services.storage.core.tenantkeys import TenantKeys
from services.storage.core.usage import NoUsageSink, StorageUsage, UsageKind, UsageSink
from services.storage.objectstore import ObjectStore, ReadableObject, StoredObjectMissing
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
#: Plaintext handed to the encryptor at a time (chunks from the wire are coalesced up to this).
_WRITE_BLOCK = 1024 * 1024
_COMMIT_ATTEMPTS = 8


@dataclass(frozen=True)
class TransferLimits:
    """Sizes that bound each transfer's memory, and how many transfers run at once."""

    pipe_bytes: int = 4 * 1024 * 1024
    chunk_bytes: int = 1024 * 1024
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
    ) -> None:
        self._store = store
        self._objects = objects
        self._keys = keys
        self._checker = checker
        self._limits = limits or TransferLimits()
        self._usage = usage or NoUsageSink()
        self.instance_id = instance_id or uuid.uuid4().hex
        self._transfers = asyncio.Semaphore(self._limits.max_concurrent_transfers)
        # Transfer work blocks on pipes and sockets: its own threads, so it never starves database calls.
        self._executor = ThreadPoolExecutor(
            max_workers=2 * self._limits.max_concurrent_transfers + 4, thread_name_prefix="storage-transfer"
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
        pipe = BoundedPipe(self._limits.pipe_bytes)
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[None] = loop.create_future()
        reader = PipeReader(pipe)

        def put() -> None:
            try:
                self._objects.put_stream(s3_key, reader, spec.content_type)
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop below
                pipe.abort(exc)
                loop.call_soon_threadsafe(_settle, stored, exc)
            else:
                loop.call_soon_threadsafe(_settle, stored, None)

        threading.Thread(target=put, name=f"s3-put-{object_id[:8]}", daemon=True).start()
        aad = content_aad(spec.tenant, spec.kind.value, spec.name, object_id)
        writer: SealingWriter | None = None
        sealing: asyncio.Future[None] | None = None
        try:
            writer = await self._io(
                SealingWriter, spec, data_key, aad, pipe, self._limits.max_object_bytes, pseudonymizer
            )
            # One block is sealed in a worker thread while the next one arrives from the network.
            block = bytearray()
            async for chunk in chunks:
                block += chunk
                if len(block) >= _WRITE_BLOCK:
                    if sealing is not None:
                        await sealing
                    sealing = loop.run_in_executor(self._executor, writer.write, bytes(block))
                    block.clear()
            if sealing is not None:
                await sealing
            if block:
                await self._io(writer.write, bytes(block))
            await self._io(writer.finish)
            await stored
            stored_bytes = await self._io(self._objects.size_of, s3_key)
            if stored_bytes != writer.destination.bytes_written:
                raise DataLoss(
                    f"the object store holds {stored_bytes} bytes of the upload, {writer.destination.bytes_written} "
                    "were sent"
                )
            if self._limits.verify_uploads:
                await self._verify(s3_key, data_key, aad, writer.sha.hexdigest(), writer.size)
            text, masking = writer.text_summary()
            record = await self._commit(
                principal, spec, object_id, s3_key, data_key, writer, stored_bytes, text, masking
            )
        except BaseException as exc:
            pipe.abort(exc if isinstance(exc, Exception) else Aborted("upload cancelled"))
            if sealing is not None:  # its failure (the aborted pipe) is a consequence, not news
                sealing.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._spawn(self._discard(object_id, s3_key, stored))
            if isinstance(exc, PipeAborted):
                # The S3 side failed first: its error is the one worth reporting.
                await asyncio.wait([stored], timeout=30)
                if stored.done() and stored.exception() is not None:
                    raise _as_domain_error(stored.exception()) from None
            if isinstance(exc, TinkError):
                raise InvalidArgument(f"cannot encrypt the upload: {exc}") from None
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
        s3_key: str,
        data_key: DataKey,
        writer: SealingWriter,
        stored_bytes: int,
        text: TextDatasetRecord | None,
        masking: MaskingRecord | None,
    ) -> VersionRecord:
        """Wraps the data key for the next version number and makes the version visible (retrying when a
        concurrent upload took the number, or a key rotation retired the key)."""
        serialized = data_key.serialize()
        for _ in range(_COMMIT_ATTEMPTS):
            key_id = await self._active_key(spec.tenant)
            version = await self._db(self._store.next_version, spec.tenant, spec.kind, spec.name)
            context = data_key_context(spec.tenant, spec.kind.value, spec.name, version, object_id, s3_key)
            record = VersionRecord(
                object_id=object_id,
                tenant=spec.tenant,
                kind=spec.kind,
                name=spec.name,
                version=version,
                s3_key=s3_key,
                size_bytes=writer.size,
                stored_bytes=stored_bytes,
                sha256=writer.sha.hexdigest(),
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

    async def _verify(self, s3_key: str, data_key: DataKey, aad: bytes, sha256: str, size: int) -> None:
        source = await self._open_stored(s3_key)
        digest = hashlib.sha256()
        total = 0
        try:
            plain = await self._io(data_key.decrypting_stream, source, aad)
            while block := await self._read(plain, source):
                digest.update(block)
                total += len(block)
        finally:
            await self._io(source.close)
        if total != size or digest.hexdigest() != sha256:
            raise DataLoss("the object store returned different bytes than were uploaded")

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _discard(self, object_id: str, s3_key: str, stored: asyncio.Future[None]) -> None:
        """After a failed upload: wait for the S3 thread to abort its multipart upload, remove whatever was
        stored, forget the pending record. Whatever fails here is left to the orphan clean-up."""
        try:
            await asyncio.wait([stored], timeout=60)
            if stored.done():
                stored.exception()  # retrieved: the failure was reported by the upload itself
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
        self, principal: Principal, tenant: str, kind: ObjectKind, name: str, version: int, offset: int, length: int
    ) -> Download:
        """Opens one version for reading; the chunks hold bytes [offset, offset+length) (to the end for 0)."""
        validate_object_name(name, kind)
        await self._authorize(principal, tenant, kind, "read")
        if offset < 0 or length < 0:
            raise InvalidArgument("offset and length must not be negative")
        record = await self._find(tenant, kind, name, version)
        if offset > record.size_bytes or (offset == record.size_bytes and record.size_bytes > 0):
            raise InvalidArgument(f"offset {offset} is past the end of the object ({record.size_bytes} bytes)")
        data_key = await self._open_data_key(record)
        end = record.size_bytes if length == 0 else min(record.size_bytes, offset + length)
        return Download(record, self._stream(record, data_key, offset, end, principal))

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

    async def _open_stored(self, s3_key: str) -> ReadableObject:
        try:
            return await self._io(self._objects.open, s3_key)
        except StoredObjectMissing:
            raise DataLoss("the object's stored bytes are missing from the object store") from None

    async def _read(self, plain: BinaryIO, source: ReadableObject) -> bytes:
        return await self._decrypted(self._io(plain.read, self._limits.chunk_bytes), source)

    @staticmethod
    async def _decrypted(read: Any, source: ReadableObject) -> bytes:
        """The result of a read of the decrypting stream; failures become DataLoss (or the store's error)."""
        try:
            return await read  # type: ignore[no-any-return]
        except (TinkError, OSError, ValueError) as exc:
            if source.error is not None:
                raise source.error from None
            log.warning("stored object failed authentication: %s", exc)
            raise DataLoss("the stored object is corrupt or was tampered with (authentication failed)") from None

    async def _stream(
        self, record: VersionRecord, data_key: DataKey, offset: int, end: int, principal: Principal
    ) -> AsyncIterator[bytes]:
        full = offset == 0 and end == record.size_bytes
        sent = 0
        loop = asyncio.get_running_loop()
        async with self._transfers:
            source = await self._open_stored(record.s3_key)
            reading: asyncio.Future[bytes] | None = None
            try:
                aad = content_aad(record.tenant, record.kind.value, record.name, record.object_id)
                plain = await self._io(data_key.decrypting_stream, source, aad)
                digest = hashlib.sha256()
                size = self._limits.chunk_bytes

                def read_block() -> bytes:
                    block = plain.read(size)
                    if full:
                        digest.update(block)
                    return block

                # The next block is read and decrypted in a worker thread while this one goes out.
                reading = loop.run_in_executor(self._executor, read_block)
                position = 0
                while position < end or full:
                    block = await self._decrypted(reading, source)
                    reading = None
                    if not block:
                        break
                    start, stop = position, position + len(block)
                    position = stop
                    if stop < end or full:
                        reading = loop.run_in_executor(self._executor, read_block)
                    if stop > offset and start < end:
                        piece = block[max(offset - start, 0) : min(end, stop) - start]
                        sent += len(piece)
                        yield piece
                if full and (position != record.size_bytes or digest.hexdigest() != record.sha256):
                    raise DataLoss("the stored object does not match its recorded size and SHA-256")
                if position < end:
                    raise DataLoss("the stored object is shorter than its recorded size")
            finally:
                if reading is not None:
                    await asyncio.wait([reading])  # never close the source under a running read
                    if not reading.cancelled():
                        reading.exception()
                await self._io(source.close)
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
            total = await self._db(self._store.stored_bytes, tenant)
            event = StorageUsage(
                f"{object_id}:{kind.value}:{uuid.uuid4().hex[:8]}", tenant, kind, size, total, datetime.now(UTC)
            )
            await self._usage.record(event)
        except Exception:  # noqa: BLE001 - usage reporting never fails a storage call
            log.warning("could not report usage", exc_info=True)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _as_domain_error(error: BaseException | None) -> BaseException:
    if isinstance(error, AidcError):
        return error
    return Unavailable(f"storing the object failed: {type(error).__name__}")


def _shredded(record: VersionRecord) -> FailedPrecondition:
    return FailedPrecondition(
        f"{record.kind.value[:-1]} {record.name!r} v{record.version} was crypto-shredded: its tenant key was "
        "destroyed and the content can never be decrypted again (delete it to remove the record)"
    )
