"""Text datasets: validation while streaming, the recorded label set and row count, and masking of personal data."""

from __future__ import annotations

import hashlib

import pytest

from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.storage.core.textdata import PiiKind, mask_text
from tests.storage.conftest import RunningStorage

ALL = frozenset(PiiKind)

MASKING_CASES = [
    ("mail me at jane.doe+ml@example.co.uk today", "mail me at [EMAIL] today", {PiiKind.EMAIL: 1}),
    ("call +1 415-555-0123 or (020) 7946 0958", "call [PHONE] or [PHONE]", {PiiKind.PHONE: 2}),
    ("手机 13812345678 联系", "手机 [PHONE] 联系", {PiiKind.PHONE: 1}),
    ("card 4111 1111 1111 1111 ok", "card [ID] ok", {PiiKind.ID_NUMBER: 1}),
    ("id 11010519491231002X end", "id [ID] end", {PiiKind.ID_NUMBER: 1}),
    ("ssn 078-05-1120.", "ssn [ID].", {PiiKind.ID_NUMBER: 1}),
    # Not personal data: dates, versions, addresses, short numbers, a 16-digit number failing the Luhn check.
    ("on 2024-01-15 v1.2.3 at 192.168.100.200", "on 2024-01-15 v1.2.3 at 192.168.100.200", {}),
    ("order 12345 costs 99.90, ref 1234567812345678", "order 12345 costs 99.90, ref 1234567812345678", {}),
]


@pytest.mark.parametrize(("text", "masked", "counts"), MASKING_CASES, ids=[c[0][:24] for c in MASKING_CASES])
def test_mask_text(text: str, masked: str, counts: dict[PiiKind, int]) -> None:
    assert mask_text(text, ALL) == (masked, counts)


def test_mask_text_only_the_kinds_asked_for() -> None:
    text = "a@b.io 13812345678"
    assert mask_text(text, frozenset({PiiKind.EMAIL})) == ("[EMAIL] 13812345678", {PiiKind.EMAIL: 1})


CSV_CONTENT = (
    b"id,text,label\r\n"
    b'1,"great product, would buy",positive\r\n'
    b'2,"terrible\nsecond line ""quoted""",negative\r\n'
    b"3,meh,neutral\r\n"
    b"4,love it,positive"  # no final newline
)


@pytest.mark.parametrize("chunk_bytes", [7, 1024 * 1024])
async def test_csv_dataset_is_validated_and_described(storage: RunningStorage, chunk_bytes: int) -> None:
    client = storage.client("acme/dev")
    await client.create_dataset("acme", "reviews")
    spec = pb.TextDatasetSpec(format=pb.DATA_FORMAT_CSV)
    info = await client.upload(
        "acme", "reviews", CSV_CONTENT, text_dataset=spec, content_type="text/csv", chunk_bytes=chunk_bytes
    )
    assert info.format == pb.DATA_FORMAT_CSV
    text = info.text_dataset
    assert (text.row_count, text.text_column, text.label_column) == (4, "text", "label")
    assert [(lc.label, lc.count) for lc in text.labels] == [("negative", 1), ("neutral", 1), ("positive", 2)]
    assert not info.HasField("masking")
    # Unmasked content is stored exactly as sent.
    assert await client.download_bytes("acme", "reviews") == CSV_CONTENT
    assert (await client.stat("acme", "reviews")).text_dataset == text


async def test_jsonl_dataset_with_custom_columns(storage: RunningStorage) -> None:
    client = storage.client("acme/dev")
    await client.create_dataset("acme", "tickets")
    content = b'{"body": "refund please", "intent": 3}\n\n{"body": "hello", "intent": "greet"}\n'
    spec = pb.TextDatasetSpec(format=pb.DATA_FORMAT_JSONL, text_column="body", label_column="intent")
    info = await client.upload("acme", "tickets", content, text_dataset=spec)
    assert info.text_dataset.row_count == 2
    assert [lc.label for lc in info.text_dataset.labels] == ["3", "greet"]


async def test_masking_replaces_personal_data_and_reports_counts(storage: RunningStorage) -> None:
    client = storage.client("acme/dev")
    await client.create_dataset("acme", "support")
    csv_content = (
        b"text,label,email_column\n"
        b"write to bob@example.com or call 13812345678,contact,keep@me.org\n"
        b"card 4111-1111-1111-1111 was charged twice,billing,x\n"
        b"no personal data here,other,y\n"
    )
    info = await client.upload(
        "acme",
        "support",
        csv_content,
        text_dataset=pb.TextDatasetSpec(format=pb.DATA_FORMAT_CSV),
        masking=pb.MaskingOptions(enabled=True),
    )
    stored = await client.download_bytes("acme", "support")
    assert stored == (
        b"text,label,email_column\n"
        b"write to [EMAIL] or call [PHONE],contact,keep@me.org\n"  # only the text column is masked
        b"card [ID] was charged twice,billing,x\n"
        b"no personal data here,other,y\n"
    )
    assert info.sha256 == hashlib.sha256(stored).hexdigest() and info.size_bytes == len(stored)
    report = info.masking
    assert (report.masked_total, report.rows_affected) == (3, 2)
    assert {c.kind: c.count for c in report.counts} == {
        pb.PII_KIND_EMAIL: 1,
        pb.PII_KIND_PHONE: 1,
        pb.PII_KIND_ID_NUMBER: 1,
    }

    jsonl = b'{"text": "mail a@b.io", "label": "x"}\n'
    await client.create_dataset("acme", "support-json")
    only_email = pb.MaskingOptions(enabled=True, kinds=[pb.PII_KIND_EMAIL])
    info = await client.upload(
        "acme", "support-json", jsonl, text_dataset=pb.TextDatasetSpec(format=pb.DATA_FORMAT_JSONL), masking=only_email
    )
    assert await client.download_bytes("acme", "support-json") == b'{"text": "mail [EMAIL]", "label": "x"}\n'
    assert [(c.kind, c.count) for c in info.masking.counts] == [(pb.PII_KIND_EMAIL, 1)]
