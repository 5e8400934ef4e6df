"""Pseudonymization (MASKING_MODE_PSEUDONYMIZE) through the real service: keyed tokens that are equal for equal
values within a tenant and differ across tenants, reveal nothing without the tenant's pseudonym key, stay stable
across a tenant-key rotation and become unlinkable when the tenant's keys are crypto-shredded."""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import pytest

from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.mesh import errors
from services.mesh.db import open_database
from services.storage.core.crypto import LocalKeyring, pseudonym_key_context
from services.storage.core.pii import PiiKind, Pseudonymizer
from services.storage.store import StorageStore
from tests.storage.conftest import RunningStorage

TOKEN = re.compile(r"\[(EMAIL|PHONE|ID|CARD):([0-9a-f]{20})\]")
PSEUDONYMIZE = pb.MaskingOptions(enabled=True, mode=pb.MASKING_MODE_PSEUDONYMIZE)
CSV = pb.TextDatasetSpec(format=pb.DATA_FORMAT_CSV)

# One person's phone, e-mail, ID and card, each written two ways, and somebody else's phone.
CONTENT = (
    "text,label\n"
    "客户手机13800138000，邮箱Zhang.San@Example.com,a\n"
    "同一个人：+86 138 0013 8000，zhang.san@example.com,b\n"
    "另一个人13900139000,c\n"
    "身份证11010519491231002X，旧证110105491231002,d\n"
    "card 6222 0212 3456 7890 128 and 6222021234567890128,e\n"
).encode()


async def _tokens(storage: RunningStorage, user: str, name: str) -> tuple[list[list[tuple[str, str]]], pb.ObjectInfo]:
    """Uploads CONTENT pseudonymized as ``user``; the (kind, token) pairs of each stored row, and the version."""
    tenant = user.split("/")[0]
    client = storage.client(user)
    await client.create_dataset(tenant, name)
    info = await client.upload(tenant, name, CONTENT, text_dataset=CSV, masking=PSEUDONYMIZE)
    stored = (await client.download_bytes(tenant, name)).decode().splitlines()[1:]
    return [TOKEN.findall(line) for line in stored], info


def _store(storage: RunningStorage) -> StorageStore:
    return StorageStore(open_database(storage.settings.database_url_for("storage")))


async def test_equal_values_equal_tokens_within_a_tenant_different_across_tenants(storage: RunningStorage) -> None:
    rows, info = await _tokens(storage, "acme/dev", "first")
    phone, email = rows[0]
    assert [kind for kind, _ in rows[0]] == ["PHONE", "EMAIL"]
    assert rows[1] == [phone, email]  # the same number and address written differently: the same tokens
    assert rows[2][0][1] != phone[1]  # another person's number
    assert rows[3][0] == rows[3][1] and rows[3][0][0] == "ID"  # an 18-digit ID and its 15-digit predecessor
    assert rows[4][0] == rows[4][1] and rows[4][0][0] == "CARD"
    report = info.masking
    assert report.mode == pb.MASKING_MODE_PSEUDONYMIZE and report.pseudonym_key_id.startswith("pk-")
    assert (report.masked_total, report.rows_affected) == (9, 5)

    again, second = await _tokens(storage, "acme/dev", "second")
    assert again == rows and second.masking.pseudonym_key_id == report.pseudonym_key_id

    other, globex = await _tokens(storage, "globex/dev", "first")
    assert globex.masking.pseudonym_key_id != report.pseudonym_key_id
    ours = {token for row in rows for _, token in row}
    theirs = {token for row in other for _, token in row}
    assert len(ours) == len(theirs) == 5 and not ours & theirs


async def test_tokens_reveal_nothing_without_the_tenant_key(storage: RunningStorage) -> None:
    rows, info = await _tokens(storage, "acme/dev", "pii")
    token = rows[0][0][1]
    store = _store(storage)
    try:
        record = store.pseudonym_key("acme")
        assert record is not None and record.pseudonym_key_id == info.masking.pseudonym_key_id
        keyring = LocalKeyring(storage.settings.master_key(), store, store.db.run)
        key = await keyring.unwrap(
            "acme", record.key_id, record.wrapped, pseudonym_key_context("acme", record.pseudonym_key_id)
        )
        database = storage.settings.database_url_for("storage").removeprefix("sqlite:///")
    finally:
        store.db.dispose()
    # With the key, the token is the HMAC of the canonical number, so an attacker holding it could test candidates...
    assert Pseudonymizer(key, record.pseudonym_key_id).token(PiiKind.PHONE, "+8613800138000") == token
    # ...but without it, trying all 10^4 numbers around the real one with unkeyed hashes finds nothing.
    candidates = [f"+86138001{n:04d}" for n in range(10_000)] + ["13800138000", "138 0013 8000"]
    for value in candidates:
        for digest in (hashlib.sha256, hashlib.sha1, hashlib.md5, hashlib.blake2b):
            for message in (value.encode(), b"PHONE\x00" + value.encode()):
                assert digest(message).hexdigest()[:20] != token
        assert hmac.digest(b"", b"PHONE\x00" + value.encode(), "sha256").hex()[:20] != token
    # The key itself is stored only wrapped by the tenant key: its bytes appear nowhere in the database files.
    files = [Path(database), Path(database + "-wal")]
    assert all(key not in f.read_bytes() for f in files if f.exists()) and record.wrapped != key


async def test_rotation_keeps_tokens_and_crypto_shredding_unlinks_them(storage: RunningStorage) -> None:
    before, first = await _tokens(storage, "acme/dev", "v")
    globex_before, _ = await _tokens(storage, "globex/dev", "v")
    admin = storage.client("acme/tadmin")

    rotated = await admin.rotate_tenant_key("acme")
    store = _store(storage)
    try:
        record = store.pseudonym_key("acme")
        assert record is not None and record.key_id == rotated.key_id  # re-wrapped by the new tenant key
        states = {k.key_id: k.state.value for k in store.keys("acme")}
        assert sorted(states.values()) == ["active", "destroyed"]  # the old key was freed and destroyed
    finally:
        store.db.dispose()
    client = storage.client("acme/dev")
    info = await client.upload("acme", "v", CONTENT, text_dataset=CSV, masking=PSEUDONYMIZE)
    after_rotation = [TOKEN.findall(line) for line in (await client.download_bytes("acme", "v")).decode().split("\n")]
    assert after_rotation[1:-1] == before
    assert info.masking.pseudonym_key_id == first.masking.pseudonym_key_id

    await admin.delete_tenant_keys("acme", confirm_tenant="acme")
    store = _store(storage)
    try:
        assert store.pseudonym_key("acme") is None  # nothing left to compute the old tokens with
        assert store.sealed_key_ids([k.key_id for k in store.keys("acme")]) == []
    finally:
        store.db.dispose()
    with pytest.raises(errors.FailedPrecondition, match="crypto-shredded"):
        await client.download_bytes("acme", "v")
    info = await client.upload("acme", "v", CONTENT, text_dataset=CSV, masking=PSEUDONYMIZE)
    fresh = [TOKEN.findall(line) for line in (await client.download_bytes("acme", "v")).decode().split("\n")[1:-1]]
    assert info.masking.pseudonym_key_id != first.masking.pseudonym_key_id
    old_tokens = {token for row in before for _, token in row}
    assert len(old_tokens) == 5 and not old_tokens & {token for row in fresh for _, token in row}
    # Another tenant's tokens are untouched.
    globex_after, _ = await _tokens(storage, "globex/dev", "w")
    assert globex_after == globex_before
