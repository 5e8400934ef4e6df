"""Text datasets checked in blocks (unmasked uploads) decide exactly as the line-by-line path does: the same summary
and stored bytes for good content, the same message (line number included) for bad content, however the content is
cut into chunks. The line path is the one masking takes; masking only e-mail addresses in content without ``@``
changes nothing, so it serves as the reference here."""

from __future__ import annotations

import json
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.mesh.errors import InvalidArgument
from services.storage.core.pii import MaskingSpec, PiiKind
from services.storage.core.textdata import (
    MAX_LABELS,
    MAX_RECORD_BYTES,
    TextDatasetProcessor,
    TextDatasetSummary,
    TextFormat,
    TextSpec,
)

_LINES = MaskingSpec(kinds=frozenset({PiiKind.EMAIL}))
Outcome = tuple[bytes, TextDatasetSummary] | str


def _run(spec: TextSpec, content: bytes, chunk: int) -> Outcome:
    processor = TextDatasetProcessor(spec)
    out = bytearray()
    try:
        for start in range(0, len(content), chunk):
            out += processor.feed(content[start : start + chunk])
        out += processor.finish()
    except InvalidArgument as exc:
        return exc.message
    return bytes(out), processor.summary


def _both(fmt: TextFormat, content: bytes, chunk: int) -> tuple[Outcome, Outcome]:
    assert b"@" not in content
    blocks = _run(TextSpec(fmt), content, chunk)
    lines = _run(TextSpec(fmt, mask=_LINES), content, chunk)
    return blocks, lines


def _csv(rows: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    words = ["ok", "不错", "slow, late", 'said "hi"', "two\nlines", "  padded  ", "物流"]
    out = [b"id,text,label\n"]
    for i in range(rows):
        text = " ".join(rng.choices(words, k=rng.randint(1, 4)))
        quoted = '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text
        out.append(f"{i},{quoted},{rng.choice(['pos', 'neg', ' neu '])}".encode() + rng.choice([b"\n", b"\r\n"]))
    return out


def _jsonl(rows: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        label: object = rng.choice(["pos", "neg", 3, " x "])
        out.append(json.dumps({"id": i, "text": f"message {i} 物流", "label": label}, ensure_ascii=False).encode())
        out.append(rng.choice([b"\n", b"\r\n", b"\n\n"]))
    return out


CSV_DAMAGE = {
    "good": lambda rows: rows,
    "byte-order mark": lambda rows: [b"\xef\xbb\xbf" + rows[0], *rows[1:]],
    "blank and white-space lines": lambda rows: [rows[0], b"\n", b"   \n", *rows[1:], b"\n"],
    "no final newline": lambda rows: [*rows[:-1], rows[-1].rstrip(b"\r\n")],
    "white space as the last line, no newline": lambda rows: [*rows, b" \t"],
    "a field too many": lambda rows: [*rows[:900], b"1,a,b,c\n", *rows[900:]],
    "empty text": lambda rows: [*rows[:1500], b"7,  ,pos\n", *rows[1500:]],
    "empty label": lambda rows: [*rows[:2200], b"7,fine, \n", *rows[2200:]],
    "label too long": lambda rows: [*rows[:10], b"7,fine," + b"x" * 300 + b"\n", *rows[10:]],
    "not UTF-8": lambda rows: [*rows[:1999], b"7,\xff\xfe,pos\n", *rows[1999:]],
    "quote never closed": lambda rows: [*rows, b'8,"open,pos\n', b"9,next,pos\n"],
    "stray quote": lambda rows: [*rows[:300], b'7,a "b" c,pos\n', *rows[300:]],
    "NUL": lambda rows: [*rows[:400], b"7,a\x00b,pos\n", *rows[400:]],
    "record too long": lambda rows: [*rows[:50], b'7,"' + b"y\n" * (MAX_RECORD_BYTES // 2) + b'",pos\n', *rows[50:]],
    "line too long": lambda rows: [*rows[:50], b"7," + b"z" * (MAX_RECORD_BYTES + 10) + b",pos\n", *rows[50:]],
    # After the first block (the header's), where Arrow reads:
    "text after a closing quote": lambda rows: [*rows[:2600], b'7,"said" so,pos\n', *rows[2600:]],
    "text after a closing doubled quote": lambda rows: [*rows[:2600], b'7,"said ""hi""" so,pos\n', *rows[2600:]],
    "text after a quoted comma": lambda rows: [*rows[:2600], b'7,"a,"b,pos\n', *rows[2600:]],
    "a late NUL": lambda rows: [*rows[:2600], b"7,a\x00b,pos\n", *rows[2600:]],
    "a lone carriage return": lambda rows: [*rows[:2600], b"7,one,pos\r8,two,pos\n", *rows[2600:]],
    "only Python's white space as text": lambda rows: [*rows[:2600], "7,\x1f\u3000,pos\n".encode(), *rows[2600:]],
    "labels padded with Python's white space": lambda rows: [
        *rows[:2600],
        "7,t,\x1cpos\u3000\n".encode(),
        *rows[2600:],
    ],
    "a field beyond csv's size limit": lambda rows: [*rows[:2600], b'7,"' + b"v" * 140_000 + b'",pos\n', *rows[2600:]],
    "a quoted field of many lines": lambda rows: [*rows[:2600], b'7,"' + b"l\r\n" * 5000 + b'",pos\n', *rows[2600:]],
    "white space before the header": lambda rows: [b"  \n", *rows],
    "header without the label": lambda rows: [b"id,text,category\n", *rows[1:]],
    "header only": lambda rows: rows[:1],
}


@pytest.mark.parametrize("damage", list(CSV_DAMAGE))
@pytest.mark.parametrize("chunk", [1, 997, 64 * 1024, 4 * 1024 * 1024])
def test_csv_blocks_decide_as_lines(damage: str, chunk: int) -> None:
    content = b"".join(CSV_DAMAGE[damage](_csv(3000, seed=len(damage))))
    if chunk == 1 and len(content) > 200_000:
        content = content[:0]  # byte by byte only for the short cases (the line path is slow)
    blocks, lines = _both(TextFormat.CSV, content, chunk)
    assert blocks == lines
    if not isinstance(blocks, str):  # unmasked content is stored exactly as it came (but for a byte-order mark)
        assert blocks[0] == content.removeprefix(b"\xef\xbb\xbf")
    if damage == "good":
        assert not isinstance(blocks, str) and blocks[0] == content and blocks[1].row_count == 3000


_GOOD = b"".join(_csv(2600, seed=3))
_PIECES = ["a", "ü", "物", ",", '"', '""', "\n", "\r", "\r\n", " ", "\t", "\x1f", "\u3000", "\x00", "pos"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_PIECES), max_size=12).map("".join), min_size=1, max_size=4))
def test_any_records_after_the_first_block_are_decided_as_lines(records: list[str]) -> None:
    """Arbitrary quoting, line ends and white space where Arrow reads (past the header's block) and in the records
    that follow."""
    late = "".join(f"7,{record},pos\n" for record in records).encode()
    content = _GOOD + late + b"".join(_csv(200, seed=4)[1:])
    blocks, lines = _both(TextFormat.CSV, content, 64 * 1024)
    assert blocks == lines


def test_arrow_decides_every_block_of_good_csv_after_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """The equivalence above would hold trivially if Arrow's path gave every block to Python's reader."""
    blocks: list[bytes] = []
    python_blocks: list[str] = []
    check_block, python_path = TextDatasetProcessor._check_block, TextDatasetProcessor._csv_block
    monkeypatch.setattr(
        TextDatasetProcessor, "_check_block", lambda self, block: blocks.append(block) or check_block(self, block)
    )
    monkeypatch.setattr(
        TextDatasetProcessor, "_csv_block", lambda self, text: python_blocks.append(text) or python_path(self, text)
    )
    outcome = _run(TextSpec(TextFormat.CSV), b"".join(_csv(30_000, seed=5)), 64 * 1024)
    assert not isinstance(outcome, str) and outcome[1].row_count == 30_000
    assert len(blocks) > 10
    assert len(python_blocks) == 1 and python_blocks[0].startswith("id,text,label\n")


JSONL_DAMAGE = {
    "good": lambda rows: rows,
    "byte-order mark": lambda rows: [b"\xef\xbb\xbf", *rows],
    "not an object": lambda rows: [*rows[:600], b"[1, 2]\n", *rows[600:]],
    "two objects on a line": lambda rows: [*rows[:10], b'{"text": "a", "label": 1}, {"text": "b", "label": 2}\n'],
    "missing key": lambda rows: [*rows[:1200], b'{"text": "hi"}\n', *rows[1200:]],
    "boolean label": lambda rows: [*rows[:30], b'{"text": "hi", "label": true}\n', *rows[30:]],
    "number text": lambda rows: [*rows[:30], b'{"text": 5, "label": "a"}\n', *rows[30:]],
    "blank text": lambda rows: [*rows[:3000], b'{"text": " ", "label": "a"}\n', *rows[3000:]],
    "not JSON": lambda rows: [*rows[:2500], b'{"text": "hi", \n', *rows[2500:]],
    "line too long": lambda rows: [*rows[:5], b'{"text": "' + b"w" * MAX_RECORD_BYTES + b'", "label": 1}\n'],
    "only blank lines": lambda rows: [b"\n", b"  \r\n"],
}


@pytest.mark.parametrize("damage", list(JSONL_DAMAGE))
@pytest.mark.parametrize("chunk", [333, 4 * 1024 * 1024])
def test_jsonl_blocks_decide_as_lines(damage: str, chunk: int) -> None:
    content = b"".join(JSONL_DAMAGE[damage](_jsonl(2000, seed=len(damage))))
    blocks, lines = _both(TextFormat.JSONL, content, chunk)
    assert blocks == lines
    if damage == "good":
        assert not isinstance(blocks, str) and blocks[0] == content


def test_one_label_too_many_is_found_at_its_line() -> None:
    rows = [b"text,label\n"] + [f"t,label-{i}\n".encode() for i in range(MAX_LABELS + 5)]
    blocks, lines = _both(TextFormat.CSV, b"".join(rows), 1024 * 1024)
    assert blocks == lines == f"line {MAX_LABELS + 2}: more than {MAX_LABELS} distinct labels"


@pytest.mark.parametrize("masked", [False, True], ids=["blocks", "lines"])
def test_a_quoted_field_of_many_lines_is_refused_within_seconds(masked: bool) -> None:
    """Regression: the line path added up its pending lines at every new line, so one record of half a million short
    lines (a quote left open) took hours to refuse."""
    content = b'id,text,label\n7,"' + b"y\n" * (MAX_RECORD_BYTES // 2 + 10) + b'",pos\n'
    started = time.monotonic()
    outcome = _run(TextSpec(TextFormat.CSV, mask=_LINES if masked else None), content, 64 * 1024)
    assert outcome == f"line 2: record longer than {MAX_RECORD_BYTES} bytes"
    assert time.monotonic() - started < 60
