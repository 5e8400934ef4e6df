"""Bad input, table-driven: each case gets a clear status, and nothing is written (no version, no stored bytes)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from services.gen.aidc.common.v1 import common_pb2
from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.mesh import errors
from services.mesh.client import translate_rpc_error
from services.storage.client import StorageClient
from tests.storage.conftest import RunningStorage

DATASET, ARTIFACT = pb.OBJECT_KIND_DATASET, pb.OBJECT_KIND_ARTIFACT
CSV = pb.TextDatasetSpec(format=pb.DATA_FORMAT_CSV)
JSONL = pb.TextDatasetSpec(format=pb.DATA_FORMAT_JSONL)


def _header(**fields: Any) -> pb.UploadRequest:
    fields.setdefault("tenant", "acme")
    fields.setdefault("kind", DATASET)
    fields.setdefault("name", "ok")
    return pb.UploadRequest(header=pb.UploadHeader(**fields))


def _chunk(data: bytes) -> pb.UploadRequest:
    return pb.UploadRequest(chunk=data)


async def _raw_upload(client: StorageClient, messages: list[pb.UploadRequest]) -> None:
    async def stream() -> Any:
        for message in messages:
            yield message

    try:
        await client.stub.Upload(stream(), timeout=10)
    except grpc.RpcError as error:
        raise translate_rpc_error(error) from None


BAD_NAMES = [
    ("", "empty"),
    ("../escape", "'..'"),
    ("a/../../b", "'..'"),
    ("/etc/passwd", "relative"),
    ("a//b", "empty"),
    ("a/./b", "'.'"),
    ("nul\x00byte", "control"),
    ("new\nline", "control"),
    ("x" * 513, "longer than 512"),
    ("back\\slash", "separator"),
    ("spaces in name", "may only contain"),
    ("ünïcode", "may only contain"),
]

UPLOADS: list[tuple[str, list[pb.UploadRequest], type[errors.AidcError], str]] = [
    *[
        (f"artifact name {why}", [_header(kind=ARTIFACT, name=name), _chunk(b"x")], errors.InvalidArgument, why)
        for name, why in BAD_NAMES
    ],
    ("dataset name with '/'", [_header(name="a/b"), _chunk(b"x")], errors.InvalidArgument, "single segment"),
    ("no header", [_chunk(b"data first")], errors.InvalidArgument, "header"),
    ("empty stream", [], errors.InvalidArgument, "header"),
    ("two headers", [_header(), _chunk(b"x"), _header()], errors.InvalidArgument, "only the first"),
    ("kind missing", [_header(kind=pb.OBJECT_KIND_UNSPECIFIED), _chunk(b"x")], errors.InvalidArgument, "kind"),
    ("bad tenant", [_header(tenant="Acme!"), _chunk(b"x")], errors.InvalidArgument, "tenant"),
    ("dataset not created", [_header(name="nope"), _chunk(b"x")], errors.NotFound, "create it first"),
    (
        "CSV without the label column",
        [_header(text_dataset=CSV), _chunk(b"text,category\nhello,greeting\n")],
        errors.InvalidArgument,
        "no column 'label'",
    ),
    (
        "CSV with declared columns missing",
        [
            _header(text_dataset=pb.TextDatasetSpec(format=pb.DATA_FORMAT_CSV, text_column="body")),
            _chunk(b"text,label\nhi,x\n"),
        ],
        errors.InvalidArgument,
        "no column 'body'",
    ),
    (
        "CSV row with an empty label",
        [_header(text_dataset=CSV), _chunk(b"text,label\nhi,\n")],
        errors.InvalidArgument,
        "line 2: empty 'label'",
    ),
    (
        "CSV row too short",
        [_header(text_dataset=CSV), _chunk(b"text,label\nhi,a\nonly\n")],
        errors.InvalidArgument,
        "line 3",
    ),
    ("CSV header only", [_header(text_dataset=CSV), _chunk(b"text,label\n")], errors.InvalidArgument, "no data rows"),
    (
        "CSV unclosed quote",
        [_header(text_dataset=CSV), _chunk(b'text,label\n"open,x\n')],
        errors.InvalidArgument,
        "never closed",
    ),
    ("not UTF-8", [_header(text_dataset=CSV), _chunk(b"text,label\n\xff\xfe,x\n")], errors.InvalidArgument, "UTF-8"),
    (
        "JSONL missing key",
        [_header(text_dataset=JSONL), _chunk(b'{"text": "hi"}\n')],
        errors.InvalidArgument,
        "no key 'label'",
    ),
    ("JSONL not JSON", [_header(text_dataset=JSONL), _chunk(b'{"text": "hi", \n')], errors.InvalidArgument, "not JSON"),
    (
        "text format opaque",
        [_header(text_dataset=pb.TextDatasetSpec(format=pb.DATA_FORMAT_OPAQUE)), _chunk(b"x")],
        errors.InvalidArgument,
        "DATA_FORMAT_CSV",
    ),
    (
        "masking without a text dataset",
        [_header(masking=pb.MaskingOptions(enabled=True)), _chunk(b"x")],
        errors.InvalidArgument,
        "masking needs text_dataset",
    ),
    (
        "masking options without masking.enabled",
        [_header(text_dataset=CSV, masking=pb.MaskingOptions(mode=pb.MASKING_MODE_PSEUDONYMIZE)), _chunk(b"t,l\n")],
        errors.InvalidArgument,
        "masking.enabled is false",
    ),
    (
        "unknown masking kind",
        [_header(text_dataset=CSV, masking=pb.MaskingOptions(enabled=True, kinds=[9])), _chunk(b"text,label\na,b\n")],
        errors.InvalidArgument,
        "masking.kinds",
    ),
    (
        "unknown masking mode",
        [_header(text_dataset=CSV, masking=pb.MaskingOptions(enabled=True, mode=7)), _chunk(b"text,label\na,b\n")],
        errors.InvalidArgument,
        "masking.mode",
    ),
    (
        "unknown phone region",
        [
            _header(text_dataset=CSV, masking=pb.MaskingOptions(enabled=True, phone_regions=["CN", "XX"])),
            _chunk(b"text,label\na,b\n"),
        ],
        errors.InvalidArgument,
        "unknown phone region 'XX'",
    ),
    (
        "too many phone regions",
        [
            _header(
                text_dataset=CSV,
                masking=pb.MaskingOptions(enabled=True, phone_regions="CN US GB DE FR JP KR SG HK".split()),
            ),
            _chunk(b"text,label\na,b\n"),
        ],
        errors.InvalidArgument,
        "phone_regions holds 9 items",
    ),
    ("wrong SHA-256", [_header(expected_sha256="0" * 64), _chunk(b"content")], errors.DataLoss, "SHA-256"),
    ("malformed SHA-256", [_header(expected_sha256="xyz"), _chunk(b"content")], errors.InvalidArgument, "64"),
    ("wrong size", [_header(expected_size_bytes=99), _chunk(b"content")], errors.DataLoss, "announced 99"),
    (
        "too much metadata",
        [_header(metadata={str(i): "v" for i in range(33)}), _chunk(b"x")],
        errors.InvalidArgument,
        "metadata",
    ),
    (
        "bad content type",
        [_header(content_type="text/\x01plain"), _chunk(b"x")],
        errors.InvalidArgument,
        "content_type",
    ),
]


@pytest.mark.parametrize(("case", "messages", "error", "message"), UPLOADS, ids=[c[0] for c in UPLOADS])
async def test_bad_uploads_are_refused_and_write_nothing(
    storage: RunningStorage, case: str, messages: list[pb.UploadRequest], error: type[errors.AidcError], message: str
) -> None:
    client = storage.client("acme/dev")
    await client.create_dataset("acme", "ok")
    await refuse_upload(storage, client, messages, error, message)


async def refuse_upload(
    storage: RunningStorage,
    client: StorageClient,
    messages: list[pb.UploadRequest],
    error: type[errors.AidcError],
    message: str,
) -> None:
    """The upload of ``messages`` gets ``error`` with ``message`` in it and stores nothing."""
    with pytest.raises(error) as info:
        await _raw_upload(client, messages)
    assert type(info.value) is error and message in info.value.message, info.value.message
    await _assert_nothing_stored(storage, client)


async def _assert_nothing_stored(storage: RunningStorage, client: StorageClient) -> None:
    assert await client.list_all("acme", all_versions=True) == []
    for _ in range(50):  # a failed upload's bytes are removed in the background
        if not storage.raw_keys() and not _incomplete(storage):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"left in the object store: {storage.raw_keys()}")


def _incomplete(storage: RunningStorage) -> int:
    objects = storage.objects
    return len(objects.client._list_multipart_uploads(objects.bucket, prefix="tenants/").uploads)


async def test_a_refused_upload_after_many_parts_leaves_nothing(storage: RunningStorage) -> None:
    """The size check fails only at the end, after several multipart parts went to the store."""
    client = storage.client("acme/dev")
    content = b"x" * (20 * 1024 * 1024)
    with pytest.raises(errors.DataLoss):
        await client.upload("acme", "big", content, kind=ARTIFACT, expected_sha256=hashlib.sha256(b"other").hexdigest())
    await _assert_nothing_stored(storage, client)


OTHER_CALLS: list[tuple[str, Callable[[StorageClient], Awaitable[Any]], type[errors.AidcError], str]] = [
    ("create dataset with a bad name", lambda c: c.create_dataset("acme", "../x"), errors.InvalidArgument, "'..'"),
    ("create dataset twice", lambda c: c.create_dataset("acme", "ok"), errors.AlreadyExists, "already exists"),
    (
        "stat without kind",
        lambda c: c.stat("acme", "ok", kind=pb.OBJECT_KIND_UNSPECIFIED),
        errors.InvalidArgument,
        "kind",
    ),
    ("stat a missing version", lambda c: c.stat("acme", "ok", version=7), errors.NotFound, "version 7"),
    ("stat a negative version", lambda c: c.stat("acme", "ok", version=-1), errors.InvalidArgument, "negative"),
    (
        "download past the end",
        lambda c: c.download_bytes("acme", "ok", offset=100),
        errors.InvalidArgument,
        "past the end",
    ),
    (
        "download a negative range",
        lambda c: c.download_bytes("acme", "ok", length=-1),
        errors.InvalidArgument,
        "negative",
    ),
    ("download a traversal", lambda c: c.download_bytes("acme", "../../etc"), errors.InvalidArgument, "'..'"),
    ("delete without a version", lambda c: c.delete("acme", "ok"), errors.InvalidArgument, "all_versions"),
    (
        "delete a version and all",
        lambda c: c.delete("acme", "ok", version=1, all_versions=True),
        errors.InvalidArgument,
        "all_versions",
    ),
    (
        "list with a bad page token",
        lambda c: c.list_objects("acme", page_token="%%%"),
        errors.InvalidArgument,
        "page_token",
    ),
    (
        "list with a negative page size",
        lambda c: c.list_objects("acme", page_size=-1),
        errors.InvalidArgument,
        "page_size",
    ),
    (
        "shred without confirmation",
        lambda c: c.delete_tenant_keys("acme", ""),
        errors.InvalidArgument,
        "confirm_tenant",
    ),
    # Found by fuzzing: SQLite refuses a LIKE pattern over 50,000 bytes as "too complex", which was INTERNAL.
    (
        "list datasets with a prefix longer than any name",
        lambda c: c.list_datasets("acme", name_prefix="x" * 70_000),
        errors.InvalidArgument,
        "name_prefix",
    ),
    (
        "list objects with a prefix longer than any name",
        lambda c: c.list_objects("acme", name_prefix="x" * 70_000),
        errors.InvalidArgument,
        "name_prefix",
    ),
    (
        "list datasets with a bad token",
        lambda c: c._unary(
            c.stub.ListDatasets, pb.ListDatasetsRequest(tenant="acme", page=common_pb2.PageRequest(page_token="@@"))
        ),
        errors.InvalidArgument,
        "page_token",
    ),
]


@pytest.mark.parametrize(("case", "call", "error", "message"), OTHER_CALLS, ids=[c[0] for c in OTHER_CALLS])
async def test_bad_requests_get_clear_statuses_and_change_nothing(
    storage: RunningStorage,
    case: str,
    call: Callable[[StorageClient], Awaitable[Any]],
    error: type[errors.AidcError],
    message: str,
) -> None:
    client = storage.client("acme/tadmin")
    await client.create_dataset("acme", "ok")
    await client.upload("acme", "ok", b"0123456789")
    await refuse_request(storage, client, call, error, message)


async def refuse_request(
    storage: RunningStorage,
    client: StorageClient,
    call: Callable[[StorageClient], Awaitable[Any]],
    error: type[errors.AidcError],
    message: str,
) -> None:
    """``call`` gets ``error`` with ``message`` in it and changes nothing (dataset "ok" holds b"0123456789")."""
    before = (await client.list_all("acme", all_versions=True), storage.raw_keys())
    with pytest.raises(error) as info:
        await call(client)
    assert type(info.value) is error and message in info.value.message, info.value.message
    assert (await client.list_all("acme", all_versions=True), storage.raw_keys()) == before
    assert await client.download_bytes("acme", "ok") == b"0123456789"
