"""Text datasets: validation while streaming, the recorded label set and row count, and masking of personal data."""

from __future__ import annotations

import hashlib

import pytest

from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.storage.core.pii import MaskingSpec, PiiKind, PiiMasker
from tests.storage.conftest import RunningStorage

ALL = MaskingSpec()

MASKING_CASES = [
    ("mail me at jane.doe+ml@example.co.uk today", "mail me at [EMAIL] today", {PiiKind.EMAIL: 1}),
    ("call +1 415-555-0123 or (020) 7946 0958", "call [PHONE] or [PHONE]", {PiiKind.PHONE: 2}),
    ("手机 13812345678 联系", "手机 [PHONE] 联系", {PiiKind.PHONE: 1}),
    ("card 4111 1111 1111 1111 ok", "card [CARD] ok", {PiiKind.BANK_CARD: 1}),
    ("id 11010519491231002X end", "id [ID] end", {PiiKind.ID_NUMBER: 1}),
    ("ssn 078-05-1120.", "ssn [ID].", {PiiKind.ID_NUMBER: 1}),
    # Glued to Chinese text (no spaces), at the start, middle and end.
    ("我的手机号13800138000谢谢", "我的手机号[PHONE]谢谢", {PiiKind.PHONE: 1}),
    ("13800138000是我的电话", "[PHONE]是我的电话", {PiiKind.PHONE: 1}),
    ("身份证号11010519491231002X请核实", "身份证号[ID]请核实", {PiiKind.ID_NUMBER: 1}),
    ("旧身份证110105491231002", "旧身份证[ID]", {PiiKind.ID_NUMBER: 1}),
    ("退款到卡号6222021234567890128上", "退款到卡号[CARD]上", {PiiKind.BANK_CARD: 1}),
    ("邮箱zhang.san@example.com谢谢", "邮箱[EMAIL]谢谢", {PiiKind.EMAIL: 1}),
    ("电话：010-62345678转分机", "电话：[PHONE]转分机", {PiiKind.PHONE: 1}),
    # A sentence's full stop ends a number; a code before a number is not part of it.
    ("my cell is 201.994.7429. 12/03/2015 it broke", "my cell is [PHONE]. 12/03/2015 it broke", {PiiKind.PHONE: 1}),
    ("INV-2021-907430 131-6677-6351 is mine", "INV-2021-907430 [PHONE] is mine", {PiiKind.PHONE: 1}),
    # Full-width digits are matched as digits; what is replaced is the span as written.
    ("电话１３８００１３８０００。", "电话[PHONE]。", {PiiKind.PHONE: 1}),
    ("卡号６２２２０２１２３４５６７８９０１２８", "卡号[CARD]", {PiiKind.BANK_CARD: 1}),
    # Not personal data: dates, versions, addresses, short numbers, numbers failing their check digit, order numbers.
    ("on 2024-01-15 v1.2.3 at 192.168.100.200", "on 2024-01-15 v1.2.3 at 192.168.100.200", {}),
    ("order 12345 costs 99.90, ref 1234567812345678", "order 12345 costs 99.90, ref 1234567812345678", {}),
    ("身份证号110105194912310021请核实", "身份证号110105194912310021请核实", {}),  # wrong check character
    # Wrong check character X, and the 17 digits before it pass Luhn after a UnionPay prefix: still no card.
    ("my 身份证 is 62010219920901695X", "my 身份证 is 62010219920901695X", {}),
    ("卡号6222021234567890127", "卡号6222021234567890127", {}),  # fails Luhn
    ("订单号4312345678901236已发货", "订单号4312345678901236已发货", {}),  # Luhn-valid, but an order number
    ("2024年3月15日下单，金额¥1,299.00，共3件", "2024年3月15日下单，金额¥1,299.00，共3件", {}),
    ("编号1031943830", "编号1031943830", {}),  # a Beijing landline only when written 010-...
]


@pytest.mark.parametrize(("text", "masked", "counts"), MASKING_CASES, ids=[c[0][:24] for c in MASKING_CASES])
def test_mask_text(text: str, masked: str, counts: dict[PiiKind, int]) -> None:
    assert PiiMasker(ALL).mask(text) == (masked, counts)


def test_mask_text_only_the_kinds_asked_for() -> None:
    text = "a@b.io 13812345678"
    masker = PiiMasker(MaskingSpec(frozenset({PiiKind.EMAIL})))
    assert masker.mask(text) == ("[EMAIL] 13812345678", {PiiKind.EMAIL: 1})


def test_phone_regions_decide_national_formats() -> None:
    """A UK number in its national format is a phone only where GB is declared; "+44" makes it one anywhere."""
    national, international = "ring 020 7946 0018 now", "ring +44 20 7946 0018 now"
    assert PiiMasker(MaskingSpec(phone_regions=("US",))).mask(national) == (national, {})
    assert PiiMasker(MaskingSpec(phone_regions=("GB",))).mask(national)[0] == "ring [PHONE] now"
    assert PiiMasker(MaskingSpec(phone_regions=("US",))).mask(international)[0] == "ring [PHONE] now"


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
        b"card [CARD] was charged twice,billing,x\n"
        b"no personal data here,other,y\n"
    )
    assert info.sha256 == hashlib.sha256(stored).hexdigest() and info.size_bytes == len(stored)
    report = info.masking
    assert (report.masked_total, report.rows_affected) == (3, 2)
    assert {c.kind: c.count for c in report.counts} == {
        pb.PII_KIND_EMAIL: 1,
        pb.PII_KIND_PHONE: 1,
        pb.PII_KIND_ID_NUMBER: 0,
        pb.PII_KIND_BANK_CARD: 1,
    }
    assert (report.mode, list(report.phone_regions), report.pseudonym_key_id) == (
        pb.MASKING_MODE_PLACEHOLDER,
        ["CN", "US"],
        "",
    )

    jsonl = b'{"text": "mail a@b.io", "label": "x"}\n'
    await client.create_dataset("acme", "support-json")
    only_email = pb.MaskingOptions(enabled=True, kinds=[pb.PII_KIND_EMAIL])
    info = await client.upload(
        "acme", "support-json", jsonl, text_dataset=pb.TextDatasetSpec(format=pb.DATA_FORMAT_JSONL), masking=only_email
    )
    assert await client.download_bytes("acme", "support-json") == b'{"text": "mail [EMAIL]", "label": "x"}\n'
    assert [(c.kind, c.count) for c in info.masking.counts] == [(pb.PII_KIND_EMAIL, 1)]


async def test_masking_finds_identifiers_glued_to_chinese_text(storage: RunningStorage) -> None:
    """Regression (issue 18): a mainland mobile, a resident ID, a bank card and an e-mail written right against
    Chinese characters survived ``--mask``; only the English-formatted row was masked."""
    client = storage.client("acme/dev")
    await client.create_dataset("acme", "kefu")
    content = (
        "text,label\n"
        "我的手机号13800138000，请尽快联系我,联系\n"
        "身份证号11010519491231002X已提交,实名\n"
        "退款请打到卡号6222021234567890128谢谢,退款\n"
        "发票寄到zhang.san@example.com吧,发票\n"
        "订单号4312345678901236，2024年3月15日下单，金额¥1299.00,物流\n"
    ).encode()
    info = await client.upload(
        "acme",
        "kefu",
        content,
        text_dataset=pb.TextDatasetSpec(format=pb.DATA_FORMAT_CSV),
        masking=pb.MaskingOptions(enabled=True),
    )
    assert (await client.download_bytes("acme", "kefu")).decode() == (
        "text,label\n"
        "我的手机号[PHONE]，请尽快联系我,联系\n"
        "身份证号[ID]已提交,实名\n"
        "退款请打到卡号[CARD]谢谢,退款\n"
        "发票寄到[EMAIL]吧,发票\n"
        "订单号4312345678901236，2024年3月15日下单，金额¥1299.00,物流\n"
    )
    assert (info.masking.masked_total, info.masking.rows_affected) == (4, 4)
