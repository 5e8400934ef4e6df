"""Envelope encryption as seen from outside: what the object store holds, tampering and truncation, key
rotation, crypto-shredding, and tenant isolation."""

from __future__ import annotations

import io
import os

import pytest

from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.mesh import errors
from services.mesh.db import open_database
from services.storage.store import StorageStore
from tests.storage.conftest import RunningStorage

MiB = 1024 * 1024
ARTIFACT = pb.OBJECT_KIND_ARTIFACT


def _raw(storage: RunningStorage, key: str) -> bytes:
    response = storage.objects.client.get_object(storage.objects.bucket, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def _put_raw(storage: RunningStorage, key: str, data: bytes) -> None:
    storage.objects.client.put_object(storage.objects.bucket, key, io.BytesIO(data), len(data))


async def _received_before_error(
    storage: RunningStorage, name: str, kind: int = pb.OBJECT_KIND_DATASET, offset: int = 0, length: int = 0
) -> bytes:
    """The plaintext a download (of a range) released before it failed (it must fail)."""
    received = bytearray()
    client = storage.client("acme/dev")
    with pytest.raises(errors.DataLoss):
        async for chunk in client.download("acme", name, kind=kind, offset=offset, length=length):  # type: ignore[arg-type]
            received += chunk
    return bytes(received)


async def test_the_object_store_holds_no_plaintext(storage: RunningStorage) -> None:
    client = storage.client("acme/dev")
    marker = b"TOP-SECRET-CUSTOMER-RECORD;"
    content = marker * (3 * MiB // len(marker))
    await client.create_dataset("acme", "secrets")
    await client.upload("acme", "secrets", content)
    await client.upload("acme", "tiny/secret", marker, kind=ARTIFACT)
    keys = storage.raw_keys()
    assert len(keys) == 2 and all(k.startswith("tenants/acme/") for k in keys)
    for key in keys:
        stored = _raw(storage, key)
        assert marker not in stored and marker[:12] not in stored
        assert len(stored) > (len(content) if "datasets" in key else len(marker))  # header and tags added
    assert await client.download_bytes("acme", "secrets") == content


@pytest.mark.parametrize("where", ["header", "first segment", "second segment", "last byte"])
async def test_one_flipped_stored_byte_is_data_loss(storage: RunningStorage, where: str) -> None:
    client = storage.client("acme/dev")
    content = os.urandom(3 * MiB + 123)
    await client.create_dataset("acme", "flip")
    await client.upload("acme", "flip", content)
    (key,) = storage.raw_keys()
    stored = bytearray(_raw(storage, key))
    position = {"header": 5, "first segment": 1000, "second segment": MiB + 1000, "last byte": len(stored) - 1}[where]
    stored[position] ^= 0x01
    _put_raw(storage, key, bytes(stored))

    received = await _received_before_error(storage, "flip")
    # Whatever was released before the failure is authentic plaintext (segments are checked before release).
    assert received == content[: len(received)] and len(received) < len(content)
    if where == "second segment":
        assert len(received) < 2 * MiB


@pytest.mark.parametrize("keep", ["all but one byte", "one segment", "header only", "nothing"])
async def test_a_truncated_stored_object_is_data_loss(storage: RunningStorage, keep: str) -> None:
    client = storage.client("acme/dev")
    content = os.urandom(2 * MiB + 7)
    await client.create_dataset("acme", "cut")
    await client.upload("acme", "cut", content)
    (key,) = storage.raw_keys()
    stored = _raw(storage, key)
    length = {"all but one byte": len(stored) - 1, "one segment": MiB, "header only": 40, "nothing": 0}[keep]
    _put_raw(storage, key, stored[:length])

    received = await _received_before_error(storage, "cut")
    assert received == content[: len(received)] and len(received) < len(content)


#: Ranges of a 4 MiB + 500 B object (segments 0-4): inside segment 1, the last MiB (segments 3-4), the head.
RANGES = {"segment 1": (MiB + 100, 1000), "last MiB": (3 * MiB + 500, 0), "head": (0, 100)}
_CONTENT = 4 * MiB + 500


@pytest.mark.parametrize(
    ("where", "fails"),
    [
        ("header", {"segment 1", "last MiB", "head"}),  # it salts every segment's key
        ("segment 1", {"segment 1"}),
        ("final segment", {"last MiB"}),
    ],
)
async def test_a_ranged_read_of_a_tampered_object_fails_exactly_where_it_covers_the_damage(
    storage: RunningStorage, where: str, fails: set[str]
) -> None:
    """A range reads and authenticates only the segments it covers: damage elsewhere does not touch it, damage in it
    is DATA_LOSS with nothing but authentic plaintext released before."""
    client = storage.client("acme/dev")
    content = os.urandom(_CONTENT)
    await client.upload("acme", "ckpt", content, kind=ARTIFACT)
    (key,) = storage.raw_keys()
    stored = bytearray(_raw(storage, key))
    stored[{"header": 10, "segment 1": MiB + 4321, "final segment": len(stored) - 1}[where]] ^= 0x01
    _put_raw(storage, key, bytes(stored))

    for name, (offset, length) in RANGES.items():
        wanted = content[offset : offset + length if length else None]
        if name in fails:
            received = await _received_before_error(storage, "ckpt", ARTIFACT, offset, length)
            assert received == wanted[: len(received)] and len(received) < len(wanted), name
        else:
            got = await client.download_bytes("acme", "ckpt", kind=ARTIFACT, offset=offset, length=length)
            assert got == wanted, name


@pytest.mark.parametrize(
    ("cut", "fails"),
    [
        ("final segment dropped", {"last MiB"}),  # what is left ends in a segment not flagged final
        ("inside the final segment", {"last MiB"}),
        ("inside segment 1", {"segment 1", "last MiB"}),
        ("header only", {"segment 1", "last MiB", "head"}),
    ],
)
async def test_a_ranged_read_of_a_truncated_object_fails_where_bytes_are_missing(
    storage: RunningStorage, cut: str, fails: set[str]
) -> None:
    client = storage.client("acme/dev")
    content = os.urandom(_CONTENT)
    await client.upload("acme", "ckpt", content, kind=ARTIFACT)
    (key,) = storage.raw_keys()
    stored = _raw(storage, key)
    length = {
        "final segment dropped": 4 * MiB,
        "inside the final segment": len(stored) - 1,
        "inside segment 1": MiB + 100,
        "header only": 40,
    }[cut]
    _put_raw(storage, key, stored[:length])

    for name, (offset, size) in RANGES.items():
        wanted = content[offset : offset + size if size else None]
        if name in fails:
            received = await _received_before_error(storage, "ckpt", ARTIFACT, offset, size)
            assert received == wanted[: len(received)] and len(received) < len(wanted), name
        else:
            assert await client.download_bytes("acme", "ckpt", kind=ARTIFACT, offset=offset, length=size) == wanted
    await _received_before_error(storage, "ckpt", ARTIFACT)  # and the whole object never reads


async def test_bytes_appended_to_a_stored_object_fail_a_whole_download(storage: RunningStorage) -> None:
    client = storage.client("acme/dev")
    content = os.urandom(2 * MiB)
    await client.upload("acme", "ckpt", content, kind=ARTIFACT)
    (key,) = storage.raw_keys()
    _put_raw(storage, key, _raw(storage, key) + b"appended")
    received = await _received_before_error(storage, "ckpt", ARTIFACT)
    assert received == content[: len(received)] and len(received) < len(content)
    # A range reads only its recorded segments, which are intact.
    assert await client.download_bytes("acme", "ckpt", kind=ARTIFACT, offset=MiB, length=10) == content[MiB : MiB + 10]


async def test_swapped_stored_objects_are_detected(storage: RunningStorage) -> None:
    """Ciphertext moved to another version's key does not open: content and keys are bound to their identity."""
    client = storage.client("acme/dev")
    await client.create_dataset("acme", "swap")
    content_one, content_two = b"version one " * 1000, b"version two " * 1000
    first = await client.upload("acme", "swap", content_one)
    await client.upload("acme", "swap", content_two)
    keys = storage.raw_keys()
    info = [await client.stat("acme", "swap", version=v) for v in (1, 2)]
    assert first.version == 1 and len(keys) == 2
    one, two = sorted(keys, key=lambda k: 0 if k == _key_of(storage, info[0]) else 1)
    _put_raw(storage, two, _raw(storage, one))
    # Version 2 now holds version 1's ciphertext: it fails before releasing a byte, of version 1's plaintext above all
    # (both contents are one repeated word, so any byte released would be the wrong version's).
    assert await _received_before_error(storage, "swap") == b""
    assert await client.download_bytes("acme", "swap", version=1) == content_one


def _key_of(storage: RunningStorage, info: pb.ObjectInfo) -> str:
    store = StorageStore(open_database(storage.settings.database_url_for("storage")))
    record = store.version(info.tenant, _kind(info.kind), info.name, info.version)
    store.db.dispose()
    assert record is not None
    return record.s3_key


def _kind(kind: int) -> object:
    from services.storage.core.names import ObjectKind

    return ObjectKind.DATASET if kind == pb.OBJECT_KIND_DATASET else ObjectKind.ARTIFACT


async def _fill(storage: RunningStorage, tenant: str = "acme") -> dict[tuple[int, str, int], bytes]:
    """Two datasets with two versions each and two artifacts; their plaintext by (kind, name, version)."""
    client = storage.client(f"{tenant}/dev")
    contents: dict[tuple[int, str, int], bytes] = {}
    for name in ("alpha", "beta"):
        await client.create_dataset(tenant, name)
        for version in (1, 2):
            data = os.urandom(1000 + version) + name.encode()
            await client.upload(tenant, name, data)
            contents[(pb.OBJECT_KIND_DATASET, name, version)] = data
    for name in ("runs/1/ckpt", "runs/1/model.pt"):
        data = os.urandom(2 * MiB + 3)
        await client.upload(tenant, name, data, kind=ARTIFACT)
        contents[(ARTIFACT, name, 1)] = data
    return contents


async def test_after_key_rotation_every_object_still_reads(storage: RunningStorage) -> None:
    contents = await _fill(storage)
    client = storage.client("acme/dev")
    before = {key: _raw(storage, key) for key in storage.raw_keys()}
    old_keys = {o.key_id for o in await client.list_all("acme", all_versions=True)}
    assert len(old_keys) == 1

    admin = storage.client("acme/tadmin")
    for _ in range(2):
        rotated = await admin.rotate_tenant_key("acme")
        assert rotated.rewrapped_objects == len(contents)
        listed = await client.list_all("acme", all_versions=True)
        assert {o.key_id for o in listed} == {rotated.key_id}
    assert rotated.key_id not in old_keys
    for (kind, name, version), data in contents.items():
        read = await client.download_bytes("acme", name, kind=kind, version=version)
        assert read == data, f"{name} v{version}"
    # Data keys were re-wrapped; the content was not re-encrypted.
    assert {key: _raw(storage, key) for key in storage.raw_keys()} == before
    # The replaced keys are destroyed, not kept around.
    store = StorageStore(open_database(storage.settings.database_url_for("storage")))
    try:
        states = {k.key_id: k.state.value for k in store.keys("acme")}
        assert states[rotated.key_id] == "active"
        assert [s for k, s in states.items() if k != rotated.key_id] == ["destroyed", "destroyed"]
        assert store.sealed_key_ids(list(states)) == [rotated.key_id]
    finally:
        store.db.dispose()
    # New uploads use the new key.
    info = await client.upload("acme", "after-rotation", b"x", kind=ARTIFACT)
    assert info.key_id == rotated.key_id


async def test_after_crypto_shredding_nothing_reads(storage: RunningStorage) -> None:
    contents = await _fill(storage)
    globex = await _fill(storage, "globex")
    admin = storage.client("acme/tadmin")
    with pytest.raises(errors.InvalidArgument):
        await admin.delete_tenant_keys("acme", confirm_tenant="globex")
    assert await storage.client("acme/dev").download_bytes("acme", "alpha") == contents[(1, "alpha", 2)]

    shredded = await admin.delete_tenant_keys("acme", confirm_tenant="acme")
    assert (shredded.destroyed_keys, shredded.shredded_objects) == (1, len(contents))
    client = storage.client("acme/dev")
    for kind, name, version in contents:
        with pytest.raises(errors.FailedPrecondition, match="crypto-shredded"):
            await client.download_bytes("acme", name, kind=kind, version=version)
        assert (await client.stat("acme", name, kind=kind, version=version)).shredded  # type: ignore[arg-type]
    # The key material is gone from the keyring, so no copy of the stored bytes (backup, replica) opens either.
    store = StorageStore(open_database(storage.settings.database_url_for("storage")))
    try:
        acme_keys = [k.key_id for k in store.keys("acme")]
        assert acme_keys and store.sealed_key_ids(acme_keys) == []
    finally:
        store.db.dispose()
    # Rotation cannot bring anything back; another tenant is untouched; the tenant can store new data.
    assert (await admin.rotate_tenant_key("acme")).rewrapped_objects == 0
    with pytest.raises(errors.FailedPrecondition):
        await client.download_bytes("acme", "alpha")
    other = storage.client("globex/dev")
    for (kind, name, version), data in globex.items():
        assert await other.download_bytes("globex", name, kind=kind, version=version) == data
    await client.upload("acme", "alpha", b"fresh start")
    assert await client.download_bytes("acme", "alpha") == b"fresh start"
    # Shredded versions can still be deleted.
    assert await client.delete("acme", "beta", all_versions=True) == [1, 2]


async def test_another_tenant_cannot_see_objects_or_whether_they_exist(storage: RunningStorage) -> None:
    owner = storage.client("acme/dev")
    await owner.create_dataset("acme", "secret")
    await owner.upload("acme", "secret", b"acme only")
    intruder = storage.client("globex/dev")
    answers: dict[str, set[tuple[str, str]]] = {}
    for name in ("secret", "does-not-exist"):
        calls = {
            "stat": lambda name=name: intruder.stat("acme", name),
            "download": lambda name=name: intruder.download_bytes("acme", name),
            "list": lambda name=name: intruder.list_objects("acme", name_prefix=name),
            "list datasets": lambda name=name: intruder.list_datasets("acme", name_prefix=name),
            "delete": lambda name=name: intruder.delete("acme", name, all_versions=True),
            "upload": lambda name=name: intruder.upload("acme", name, b"overwrite"),
        }
        for what, call in calls.items():
            with pytest.raises(errors.PermissionDenied) as info:
                await call()
            answers.setdefault(what, set()).add((type(info.value).__name__, info.value.message))
    # The same answer whether or not the object exists: nothing is looked up before the permission check.
    assert all(len(seen) == 1 for seen in answers.values()), answers
    # A viewer reads, a billing viewer does not; neither writes.
    viewer, billing = storage.client("acme/viewer"), storage.client("acme/billing")
    assert await viewer.download_bytes("acme", "secret") == b"acme only"
    for denied in (lambda: viewer.upload("acme", "secret", b"x"), lambda: billing.stat("acme", "secret")):
        with pytest.raises(errors.PermissionDenied):
            await denied()
    assert await owner.download_bytes("acme", "secret") == b"acme only"
    assert [o.version for o in await owner.list_all("acme", all_versions=True)] == [1]
