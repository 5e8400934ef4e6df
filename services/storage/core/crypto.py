"""Envelope encryption: a fresh data key per object (a Tink streaming-AEAD keyset, AES256_GCM_HKDF_1MB) seals
the content in authenticated 1 MiB segments; the data key is wrapped by the tenant's key, which a key manager
holds.

``KeyManager`` is the seam for a KMS: the default ``LocalKeyring`` keeps tenant keys in the storage database,
each sealed (AES-256-GCM) under the service's master key; HashiCorp Vault's transit engine or MinIO KES can
implement the same four calls (create a named key, encrypt and decrypt with a context, delete the key).

Associated data binds every ciphertext to what it belongs to, so nothing can be swapped unnoticed:

* content: ``aidc-storage/v1/content`` + tenant, kind, name and the upload's random object id;
* wrapped data key: ``aidc-storage/v1/data-key`` + tenant, kind, name, version, object id and object-store key;
* wrapped pseudonym key: ``aidc-storage/v1/pseudonym-key`` + tenant and pseudonym key id;
* sealed tenant key: ``aidc-storage/v1/tenant-key`` + tenant and key id.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO, Protocol

import tink
from cryptography.exceptions import InvalidTag
from google.protobuf.message import DecodeError
from tink import secret_key_access, streaming_aead
from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2

from services.mesh.errors import DataLoss, FailedPrecondition
from services.mesh.sealing import WrongMasterKey, seal, unseal
from services.mesh.segments import SegmentLayout

__all__ = [
    "KeyManager",
    "KeyDestroyed",
    "LocalKeyring",
    "KeyringStore",
    "SealedKey",
    "DataKey",
    "StreamKey",
    "content_aad",
    "data_key_context",
    "pseudonym_key_context",
    "TinkError",
]

streaming_aead.register()

_TEMPLATE = streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB
_STREAMING_KEY_TYPE = "type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey"
TinkError = tink.TinkError


def _encode(*parts: str | int) -> bytes:
    """Length-prefixed fields, so no two different tuples encode to the same bytes."""
    out = bytearray()
    for part in parts:
        data = str(part).encode()
        out += len(data).to_bytes(4, "big") + data
    return bytes(out)


def content_aad(tenant: str, kind: str, name: str, object_id: str) -> bytes:
    """Associated data of an object's content."""
    return _encode("aidc-storage/v1/content", tenant, kind, name, object_id)


def data_key_context(tenant: str, kind: str, name: str, version: int, object_id: str, s3_key: str) -> bytes:
    """Associated data of a wrapped data key: the exact stored version it opens."""
    return _encode("aidc-storage/v1/data-key", tenant, kind, name, version, object_id, s3_key)


def pseudonym_key_context(tenant: str, pseudonym_key_id: str) -> bytes:
    """Associated data of a tenant's wrapped pseudonym key."""
    return _encode("aidc-storage/v1/pseudonym-key", tenant, pseudonym_key_id)


class KeyDestroyed(FailedPrecondition):
    """The tenant key was destroyed (crypto-shredded): what it wrapped can never be read again."""


class KeyManager(Protocol):
    """Holds tenant keys and wraps data keys with them; the key material never leaves it."""

    async def create_key(self, tenant: str) -> str:
        """Creates a new key for ``tenant`` and returns its id."""
        ...

    async def wrap(self, tenant: str, key_id: str, plaintext: bytes, context: bytes) -> bytes:
        """Encrypts ``plaintext`` (a data key) under the tenant key ``key_id``, bound to ``context``."""
        ...

    async def unwrap(self, tenant: str, key_id: str, ciphertext: bytes, context: bytes) -> bytes:
        """Decrypts a wrapped data key; KeyDestroyed if the key is gone, DataLoss if the wrapped bytes or the
        context don't authenticate."""
        ...

    async def destroy_key(self, tenant: str, key_id: str) -> None:
        """Destroys the key material for good; idempotent."""
        ...


@dataclass(frozen=True)
class SealedKey:
    """A tenant key as the local keyring stores it: sealed under the master key."""

    key_id: str
    tenant: str
    sealed: bytes
    created_at: datetime


class KeyringStore(Protocol):
    """Where the local keyring keeps sealed tenant keys (the storage database)."""

    def put_sealed_key(self, key: SealedKey) -> None: ...

    def sealed_key(self, key_id: str) -> SealedKey | None: ...

    def delete_sealed_key(self, key_id: str) -> None: ...

    def any_sealed_key(self) -> SealedKey | None: ...


class LocalKeyring:
    """The default KeyManager: 256-bit tenant keys (AES-256-GCM) sealed under the master key in the database.

    Unsealed keys are cached in memory; destroying a key removes it from the cache and deletes its sealed
    copy, after which nothing it wrapped can be unwrapped by anyone.
    """

    def __init__(
        self,
        master_key: bytes,
        store: KeyringStore,
        run: Callable[..., Awaitable[Any]],
    ) -> None:
        if len(master_key) != 32:
            raise ValueError("the master key must be 32 bytes")
        self._master = master_key
        self._store = store
        self._run = run  # runs blocking store calls off the event loop (Database.run)
        self._cache: dict[str, bytes] = {}

    def check_master_key(self) -> None:
        """Refuses (WrongMasterKey) a master key that does not open the tenant keys already sealed: a service started
        with it would answer every download DATA_LOSS. Blocking: called once, at start."""
        sealed = self._store.any_sealed_key()
        if sealed is None:
            return
        try:
            unseal(self._master, sealed.sealed, self._aad(sealed.tenant, sealed.key_id))
        except InvalidTag:
            raise WrongMasterKey(
                f"tenant key {sealed.key_id} does not open with this master key: AIDC_STORAGE_MASTER_KEY (or "
                "<data_dir>/storage/master.key) is not the key the storage database was sealed with"
            ) from None

    @staticmethod
    def _aad(tenant: str, key_id: str) -> bytes:
        return _encode("aidc-storage/v1/tenant-key", tenant, key_id)

    async def create_key(self, tenant: str) -> str:
        key_id = f"tk-{secrets.token_hex(12)}"
        material = secrets.token_bytes(32)
        sealed = SealedKey(key_id, tenant, seal(self._master, material, self._aad(tenant, key_id)), datetime.now(UTC))
        await self._run(self._store.put_sealed_key, sealed)
        self._cache[key_id] = material
        return key_id

    async def _material(self, tenant: str, key_id: str) -> bytes:
        material = self._cache.get(key_id)
        if material is not None:
            return material
        sealed: SealedKey | None = await self._run(self._store.sealed_key, key_id)
        if sealed is None:
            raise KeyDestroyed(f"tenant key {key_id} was destroyed (crypto-shredded); its data can't be decrypted")
        if sealed.tenant != tenant:
            raise DataLoss(f"tenant key {key_id} does not belong to tenant {tenant!r}")
        try:
            material = unseal(self._master, sealed.sealed, self._aad(tenant, key_id))
        except InvalidTag:
            raise DataLoss(f"tenant key {key_id} does not open with this master key") from None
        self._cache[key_id] = material
        return material

    async def wrap(self, tenant: str, key_id: str, plaintext: bytes, context: bytes) -> bytes:
        return seal(await self._material(tenant, key_id), plaintext, _encode(key_id) + context)

    async def unwrap(self, tenant: str, key_id: str, ciphertext: bytes, context: bytes) -> bytes:
        material = await self._material(tenant, key_id)
        try:
            return unseal(material, ciphertext, _encode(key_id) + context)
        except InvalidTag:
            raise DataLoss("the object's wrapped data key failed authentication (tampered or misplaced)") from None

    async def destroy_key(self, tenant: str, key_id: str) -> None:
        self._cache.pop(key_id, None)
        await self._run(self._store.delete_sealed_key, key_id)


@dataclass(frozen=True)
class StreamKey:
    """What a data key is to the segment cipher (services.mesh.segments): the key and the layout."""

    key: bytes = field(repr=False)
    layout: SegmentLayout


class DataKey:
    """One object's data key: a Tink streaming-AEAD keyset of one AES256_GCM_HKDF_1MB key.

    Content is sealed and opened segment by segment from the key itself (``stream_key``); Tink's own stream
    objects, which read and write the same format, remain available (``encrypting_stream``/``decrypting_stream``).
    """

    def __init__(self, serialized: bytes) -> None:
        self._serialized = serialized
        self._stream_key = self._parse_stream_key(serialized)

    @classmethod
    def generate(cls) -> DataKey:
        return cls(tink.proto_keyset_format.serialize(tink.new_keyset_handle(_TEMPLATE), secret_key_access.TOKEN))

    @classmethod
    def parse(cls, serialized: bytes) -> DataKey:
        """A data key from its serialized keyset; DataLoss if it is not one this service wrote."""
        return cls(serialized)

    def serialize(self) -> bytes:
        """The keyset's bytes, to be wrapped by the tenant key and never stored as they are."""
        return self._serialized

    def stream_key(self) -> StreamKey:
        """The keyset's one AES-GCM-HKDF streaming key and its segment layout (see services.mesh.segments)."""
        return self._stream_key

    @staticmethod
    def _parse_stream_key(serialized: bytes) -> StreamKey:
        try:
            keyset = tink_pb2.Keyset.FromString(serialized)
            entry = keyset.key[0] if len(keyset.key) == 1 else None
            if (
                entry is None
                or entry.key_data.type_url != _STREAMING_KEY_TYPE
                or entry.status != tink_pb2.ENABLED
                or entry.output_prefix_type != tink_pb2.RAW
                or entry.key_id != keyset.primary_key_id
            ):
                raise DataLoss("the object's data key is not one enabled AES-GCM-HKDF streaming key")
            key = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey.FromString(entry.key_data.value)
        except DecodeError:
            raise DataLoss("the object's data key is malformed") from None
        params = key.params
        if params.hkdf_hash_type != common_pb2.SHA256 or params.derived_key_size != 32 or len(key.key_value) != 32:
            raise DataLoss("the object's data key has parameters this service does not read")
        try:
            return StreamKey(key.key_value, SegmentLayout(params.ciphertext_segment_size))
        except ValueError:
            raise DataLoss("the object's data key has parameters this service does not read") from None

    def _primitive(self) -> streaming_aead.StreamingAead:
        try:
            handle = tink.proto_keyset_format.parse(self._serialized, secret_key_access.TOKEN)
        except tink.TinkError:
            raise DataLoss("the object's data key is malformed") from None
        return handle.primitive(streaming_aead.StreamingAead)

    def encrypting_stream(self, destination: io.RawIOBase | BinaryIO, aad: bytes) -> BinaryIO:
        """Tink's stream: writes ciphertext of what is written to it into ``destination``; close() finishes it."""
        return self._primitive().new_encrypting_stream(destination, aad)

    def decrypting_stream(self, source: io.RawIOBase | BinaryIO, aad: bytes) -> BinaryIO:
        """Tink's stream: reads plaintext of ``source``, every segment authenticated before any of it is returned;
        a missing end (truncation) fails the last read."""
        return self._primitive().new_decrypting_stream(source, aad)
