"""Recall and precision of personal-data masking, per kind, on a labelled evaluation set of Chinese, English and
mixed messages generated from a seed (tests/storage/pii_corpus.py); the table is printed with every run. Then the
same set is uploaded through the real service and comes back masked exactly as the scanner says."""

from __future__ import annotations

import csv
import io
import re
from collections import Counter

import pytest

from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.storage.core import pii
from services.storage.core.pii import MaskingSpec, PiiKind, PiiMasker, PiiScanner
from tests.storage.conftest import RunningStorage
from tests.storage.pii_corpus import LabelledRow, evaluation_set

SEED = 18
ROWS = 900  # 300 each in Chinese, English and mixed text
#: What the issue asks of every kind.
BAR = 0.99


def _evaluate(rows: list[LabelledRow]) -> tuple[str, dict[str, tuple[float, float]], int, int]:
    """The printed table, (recall, precision) per kind, and how many numbers that must stay were touched / exist."""
    scanner = PiiScanner(frozenset(PiiKind))
    hits: Counter[str] = Counter()
    wrong: Counter[str] = Counter()
    missed: Counter[str] = Counter()
    by_language: Counter[tuple[str, str]] = Counter()
    touched = numbers = 0
    mistakes: list[str] = []
    for row in rows:
        gold = set(row.spans)
        found = {(span.kind.name, span.start, span.end) for span in scanner.find(row.text)}
        for kind, _, _ in found & gold:
            hits[kind] += 1
            by_language[(kind, row.language)] += 1
        for kind, start, end in found - gold:
            wrong[kind] += 1
            mistakes.append(f"  wrong {kind}: {row.text[start:end]!r} in {row.text!r}")
        for kind, start, end in gold - found:
            missed[kind] += 1
            mistakes.append(f"  missed {kind}: {row.text[start:end]!r} in {row.text!r}")
        for _, start, end in row.numbers:
            numbers += 1
            touched += any(s < end and start < e for _, s, e in found)
    lines = [
        f"personal-data masking, seed {SEED}: {len(rows)} rows "
        f"({', '.join(f'{n} {lang}' for lang, n in sorted(Counter(r.language for r in rows).items()))})",
        f"{'kind':<10}{'labelled':>9}{'right':>7}{'wrong':>7}{'missed':>8}{'recall':>8}{'precision':>11}"
        f"{'zh/en/mixed right':>19}",
    ]
    scores: dict[str, tuple[float, float]] = {}
    for kind in PiiKind:
        name = kind.name
        labelled = hits[name] + missed[name]
        recall = hits[name] / labelled if labelled else 0.0
        precision = hits[name] / (hits[name] + wrong[name]) if hits[name] + wrong[name] else 0.0
        scores[name] = (recall, precision)
        split = "/".join(str(by_language[(name, lang)]) for lang in ("zh", "en", "mixed"))
        lines.append(
            f"{name:<10}{labelled:>9}{hits[name]:>7}{wrong[name]:>7}{missed[name]:>8}{recall:>8.3f}{precision:>11.3f}"
            f"{split:>19}"
        )
    lines.append(f"numbers that must stay (orders, dates, prices, bad check digits...): {numbers}, touched: {touched}")
    return "\n".join(lines + mistakes), scores, touched, numbers


def test_recall_and_precision_per_kind(capsys: pytest.CaptureFixture[str]) -> None:
    rows = evaluation_set(SEED, ROWS)
    table, scores, touched, numbers = _evaluate(rows)
    with capsys.disabled():
        print("\n" + table)
    assert len(rows) >= 300 and {r.language for r in rows} == {"zh", "en", "mixed"}
    assert numbers >= 300, "the set must hold plenty of numbers that are not personal data"
    for kind, (recall, precision) in scores.items():
        labelled = sum(1 for row in rows for span in row.spans if span[0] == kind)
        assert labelled >= 80, f"too few {kind} in the set to measure"
        assert recall >= BAR and precision >= BAR, f"{kind}: recall {recall:.3f}, precision {precision:.3f}\n{table}"
    assert touched <= numbers * (1 - BAR), table


def test_the_evaluation_set_is_hard() -> None:
    """The set exercises what the issue lists: identifiers glued to CJK text, full-width digits, separators, old IDs,
    identifiers at the start and end of a message, and wrong check digits among the numbers that must stay."""
    rows = evaluation_set(SEED, ROWS)
    spans = [(row, kind, row.text[s:e], s, e) for row in rows for kind, s, e in row.spans]

    def glued(row: LabelledRow, s: int, e: int) -> bool:
        near = row.text[s - 1 : s] + row.text[e : e + 1]
        return any("\u4e00" <= ch <= "\u9fff" for ch in near)

    assert sum(glued(row, s, e) for row, _, _, s, e in spans) >= 150
    assert sum(any("\uff10" <= ch <= "\uff19" for ch in value) for _, _, value, _, _ in spans) >= 30
    assert sum(" " in value or "-" in value for _, kind, value, _, _ in spans if kind == "BANK_CARD") >= 20
    assert sum(len(value) == 15 for _, kind, value, _, _ in spans if kind == "ID_NUMBER") >= 10
    assert sum(s == 0 for _, _, _, s, _ in spans) >= 50
    assert sum(e >= len(row.text) - 1 for row, _, _, _, e in spans) >= 50
    near_misses = [row.text[s:e] for row in rows for context, s, e in row.numbers if context in PiiKind.__members__]
    assert len(near_misses) >= 60


async def test_the_evaluation_set_masked_through_the_service(storage: RunningStorage) -> None:
    rows = evaluation_set(SEED, ROWS)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows([row.text, row.language] for row in rows)
    client = storage.client("acme/dev")
    await client.create_dataset("acme", "evaluation")
    info = await client.upload(
        "acme",
        "evaluation",
        buffer.getvalue().encode(),
        text_dataset=pb.TextDatasetSpec(format=pb.DATA_FORMAT_CSV),
        masking=pb.MaskingOptions(enabled=True),
        chunk_bytes=4096,
    )
    stored = list(csv.reader(io.StringIO((await client.download_bytes("acme", "evaluation")).decode())))
    masker = PiiMasker(MaskingSpec())
    expected = [masker.mask(row.text) for row in rows]
    assert stored[0] == ["text", "label"]
    assert [r[0] for r in stored[1:]] == [text for text, _ in expected]
    totals: Counter[PiiKind] = Counter()
    for _, counts in expected:
        totals.update(counts)
    assert info.masking.masked_total == sum(len(row.spans) for row in rows) == sum(totals.values())
    assert {pb.PiiKind.Name(c.kind)[len("PII_KIND_") :]: c.count for c in info.masking.counts} == {
        kind.name: totals[kind] for kind in PiiKind
    }


def test_the_phone_prefilter_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shortcuts in front of PhoneNumberMatcher (the metadata prefilter, the IPv4/date/code exclusions, VALID for
    numbers written as one run of digits) find exactly what the matcher finds without them, on the evaluation set."""
    rows = evaluation_set(SEED + 1, ROWS)
    scanner = PiiScanner(frozenset({PiiKind.PHONE}))
    fast = [[(s.start, s.end, s.canonical) for s in scanner.find(row.text)] for row in rows]
    monkeypatch.setattr(pii, "_NOT_A_PHONE", re.compile("(?!)"))
    monkeypatch.setattr(pii, "_after_code", lambda text, start: False)
    monkeypatch.setattr(pii, "_leniency_for", lambda cluster, suffix: pii.Leniency.STRICT_GROUPING)
    monkeypatch.setattr(pii._PhonePlan, "possible", lambda self, digits: True)
    plain = PiiScanner(frozenset({PiiKind.PHONE}))
    plain._any_region = re.compile(".*")
    slow = [[(s.start, s.end, s.canonical) for s in plain.find(row.text)] for row in rows]
    differences = [(row.text, f, s) for row, f, s in zip(rows, fast, slow, strict=True) if f != s]
    assert sum(map(len, slow)) >= 300 and not differences, differences[:5]
