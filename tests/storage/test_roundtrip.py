"""Upload and download round trips through the real service and a real S3 server."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from dataclasses import replace
from pathlib import Path

import pytest

from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.mesh import errors
from services.mesh.db import open_database
from services.storage.config import StorageSettings
from services.storage.core.crypto import DataKey, LocalKeyring, content_aad, data_key_context
from services.storage.core.names import ObjectKind
from services.storage.store import StorageStore
from tests.conftest import RunningAuth
from tests.storage.conftest import RunningStorage, start_storage, storage_env
from tests.storage.seaweed import SeaweedFS

MiB = 1024 * 1024


@pytest.mark.parametrize("size", [0, 1, 5 * MiB + 1], ids=["0B", "1B", "5MiB+1B"])
async def test_round_trip(storage: RunningStorage, size: int) -> None:
    client = storage.client("acme/dev")
    content = os.urandom(size)
    await client.create_dataset("acme", "blobs")
    info = await client.upload("acme", "blobs", content)
    assert (info.version, info.size_bytes) == (1, size)
    assert info.sha256 == hashlib.sha256(content).hexdigest()
    assert await client.download_bytes("acme", "blobs") == content
    stat = await client.stat("acme", "blobs")
    assert (stat.version, stat.size_bytes, stat.sha256) == (1, size, info.sha256)


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 10), (MiB - 3, 10), (2 * MiB + 100, 0), (3 * MiB + 4, 100), (0, 0)],
    ids=["head", "across a segment boundary", "to the end", "clipped at the end", "everything"],
)
async def test_ranged_download(storage: RunningStorage, offset: int, length: int) -> None:
    client = storage.client("acme/dev")
    content = os.urandom(3 * MiB + 5)
    await client.upload("acme", "ckpt/model.bin", content, kind=pb.OBJECT_KIND_ARTIFACT)
    got = await client.download_bytes(
        "acme", "ckpt/model.bin", kind=pb.OBJECT_KIND_ARTIFACT, offset=offset, length=length
    )
    assert got == content[offset : offset + length if length else None]


async def test_versions_listing_pagination_and_delete(storage: RunningStorage) -> None:
    client = storage.client("acme/dev")
    await client.create_dataset("acme", "corpus", "support tickets")
    for n in (1, 2, 3):
        info = await client.upload("acme", "corpus", f"version {n}".encode(), metadata={"n": str(n)})
        assert info.version == n and info.metadata == {"n": str(n)} and info.created_by == "user:acme/dev"
    for i in range(5):
        await client.upload("acme", f"runs/r{i}/metrics.json", b"{}", kind=pb.OBJECT_KIND_ARTIFACT)
    assert await client.download_bytes("acme", "corpus", version=2) == b"version 2"
    assert await client.download_bytes("acme", "corpus") == b"version 3"
    [dataset] = await client.list_datasets("acme")
    assert (dataset.name, dataset.description, dataset.latest_version) == ("corpus", "support tickets", 3)

    latest = await client.list_all("acme")
    assert [(o.kind, o.name, o.version) for o in latest] == [
        (pb.OBJECT_KIND_ARTIFACT, f"runs/r{i}/metrics.json", 1) for i in range(5)
    ] + [(pb.OBJECT_KIND_DATASET, "corpus", 3)]
    pages, token, seen = 0, "", []
    while True:
        page, token = await client.list_objects("acme", all_versions=True, page_size=3, page_token=token)
        pages += 1
        seen += [(o.name, o.version) for o in page]
        if not token:
            break
    assert pages == 3 and len(seen) == 8 and len(set(seen)) == 8
    only = await client.list_all("acme", kind=pb.OBJECT_KIND_ARTIFACT, name_prefix="runs/r3")
    assert [o.name for o in only] == ["runs/r3/metrics.json"]

    keys_before = len(storage.raw_keys())
    assert await client.delete("acme", "corpus", version=2) == [2]
    assert [o.version for o in await client.list_all("acme", name_prefix="corpus", all_versions=True)] == [1, 3]
    assert len(storage.raw_keys()) == keys_before - 1
    assert await client.delete("acme", "corpus", all_versions=True) == [1, 3]
    assert await client.list_datasets("acme") == []
    assert len(storage.raw_keys()) == keys_before - 3
    with pytest.raises(errors.NotFound):
        await client.stat("acme", "corpus")
    with pytest.raises(errors.NotFound):
        await client.delete("acme", "corpus", all_versions=True)


async def test_download_to_a_file_is_atomic(storage: RunningStorage, tmp_path: Path) -> None:
    tmp_path = tmp_path / "files"
    tmp_path.mkdir()
    client = storage.client("acme/dev")
    content = os.urandom(2 * MiB)
    await client.create_dataset("acme", "file")
    source = tmp_path / "source.bin"
    source.write_bytes(content)
    info = await client.upload("acme", "file", source)
    assert info.size_bytes == len(content)
    target = tmp_path / "out.bin"
    assert (await client.download_to("acme", "file", target)).sha256 == info.sha256
    assert target.read_bytes() == content
    # A failed download leaves neither the target nor a partial file behind.
    (key,) = storage.raw_keys()
    storage.objects.client.put_object(storage.objects.bucket, key, io.BytesIO(b"garbage"), 7)
    with pytest.raises(errors.DataLoss):
        await client.download_to("acme", "file", tmp_path / "bad.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "source.bin"]


class _Keep(io.BytesIO):
    def close(self) -> None:  # Tink closes its destination
        pass


async def test_objects_sealed_by_tinks_own_stream_read_whole_and_in_ranges(storage: RunningStorage) -> None:
    """Objects stored before segments were sealed one by one were written by Tink's Python stream: the same format,
    so they read as they are, whole and in ranges; and Tink's stream opens what the service stores now."""
    client = storage.client("acme/dev")
    content = os.urandom(3 * MiB + 77)
    info = await client.upload("acme", "legacy/model.bin", content, kind=pb.OBJECT_KIND_ARTIFACT)
    db = open_database(storage.settings.database_url_for("storage"))
    try:
        store = StorageStore(db)
        record = store.version("acme", ObjectKind.ARTIFACT, "legacy/model.bin", info.version)
        assert record is not None
        keyring = LocalKeyring(storage.settings.master_key(), store, db.run)
        context = data_key_context("acme", "artifacts", record.name, record.version, record.object_id, record.s3_key)
        data_key = DataKey.parse(await keyring.unwrap("acme", record.key_id, record.wrapped_key, context))
    finally:
        db.dispose()
    aad = content_aad("acme", "artifacts", record.name, record.object_id)
    objects = storage.objects
    response = objects.client.get_object(objects.bucket, record.s3_key)
    try:
        stored = response.read()
    finally:
        response.close()
        response.release_conn()
    assert data_key.decrypting_stream(io.BytesIO(stored), aad).read() == content

    by_tink = _Keep()
    with data_key.encrypting_stream(by_tink, aad) as stream:
        stream.write(content)
    sealed = by_tink.getvalue()
    assert len(sealed) == len(stored) == record.stored_bytes and sealed != stored  # same layout, another salt
    objects.client.put_object(objects.bucket, record.s3_key, io.BytesIO(sealed), len(sealed))
    assert await client.download_bytes("acme", "legacy/model.bin", kind=pb.OBJECT_KIND_ARTIFACT) == content
    for offset, length in [(0, 10), (MiB - 60, 100), (2 * MiB + 5, 0), (3 * MiB + 70, 0)]:
        got = await client.download_bytes(
            "acme", "legacy/model.bin", kind=pb.OBJECT_KIND_ARTIFACT, offset=offset, length=length
        )
        assert got == content[offset : offset + length if length else None], (offset, length)


async def test_many_small_downloads_run_beside_a_stalled_stream(storage: RunningStorage) -> None:
    """Downloads share one channel and the service's transfer threads: a large download whose reader stopped
    reading holds back none of forty small ones started meanwhile."""
    client = storage.client("acme/dev")
    big = os.urandom(8 * MiB)
    await client.upload("acme", "big", big, kind=pb.OBJECT_KIND_ARTIFACT)
    small = {f"ckpt/{i:02d}": os.urandom(1000 + i) for i in range(40)}
    for name, data in small.items():
        await client.upload("acme", name, data, kind=pb.OBJECT_KIND_ARTIFACT)
    _, chunks = await client.open_download("acme", "big", kind=pb.OBJECT_KIND_ARTIFACT)
    first = await anext(chunks)  # the big download is under way, and stays unread meanwhile

    async def fetch(name: str) -> bytes:
        return await client.download_bytes("acme", name, kind=pb.OBJECT_KIND_ARTIFACT)

    got = await asyncio.wait_for(asyncio.gather(*(fetch(name) for name in small)), timeout=120)
    assert got == list(small.values())
    assert b"".join([first, *[chunk async for chunk in chunks]]) == big


async def test_uploads_read_back_before_they_become_visible(
    auth: RunningAuth, tokens: dict[str, str], seaweed: SeaweedFS, tmp_path: Path
) -> None:
    """With AIDC_STORAGE_VERIFY_UPLOADS every upload is read back, opened and hashed again before its version is
    committed; multi-part objects included."""
    env = storage_env(tmp_path / "data", auth.address, seaweed, AIDC_STORAGE_VERIFY_UPLOADS="true")
    storage = await start_storage(StorageSettings.from_env(env), tokens)
    try:
        client = storage.client("acme/dev")
        for size in (0, 5, 20 * MiB + 3):
            content = os.urandom(size)
            info = await client.upload("acme", f"checked/{size}", content, kind=pb.OBJECT_KIND_ARTIFACT)
            assert info.sha256 == hashlib.sha256(content).hexdigest()
            assert await client.download_bytes("acme", f"checked/{size}", kind=pb.OBJECT_KIND_ARTIFACT) == content
    finally:
        await storage.close()
        await storage.server.stop(0)


async def test_a_client_held_to_grpcs_default_4_mib_messages_downloads_a_large_object(storage: RunningStorage) -> None:
    """gRPC clients in every language refuse messages over 4 MiB unless told otherwise; a download's messages stay
    under that, whatever the object's size."""
    content = os.urandom(11 * MiB + 7)
    await storage.client().upload("acme", "big", content, kind=pb.OBJECT_KIND_ARTIFACT)
    default_limit = replace(storage.settings, max_message_bytes=4 * MiB)
    default_limit.validate()  # the least the service accepts
    with pytest.raises(ValueError, match="at least 4 MiB"):
        replace(storage.settings, max_message_bytes=4 * MiB - 1).validate()
    client = storage.client(settings=default_limit)
    assert await client.download_bytes("acme", "big", kind=pb.OBJECT_KIND_ARTIFACT) == content
