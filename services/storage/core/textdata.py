"""Text-classification datasets (CSV with a header row, or JSON Lines) checked while they stream in: the text
and label columns are present, every row has a non-empty text and label; the row count and label set are
recorded. Optionally personal data in the text column is masked (e-mail addresses, phone numbers, ID and card
numbers), and the masked spans are counted.

The content is processed record by record, so memory stays bounded by the longest record, whatever the size
of the dataset.
"""

from __future__ import annotations

import csv
import enum
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from services.mesh.errors import InvalidArgument

__all__ = [
    "TextFormat",
    "PiiKind",
    "TextSpec",
    "TextDatasetSummary",
    "TextDatasetProcessor",
    "mask_text",
    "MAX_RECORD_BYTES",
    "MAX_LABELS",
]

#: Longest record (one CSV record or JSON line) accepted.
MAX_RECORD_BYTES = 1024 * 1024
#: Most distinct labels a dataset may have.
MAX_LABELS = 10_000
_MAX_LABEL_CHARS = 256


class TextFormat(enum.Enum):
    CSV = "csv"
    JSONL = "jsonl"


class PiiKind(enum.Enum):
    """Kinds of personal data the masking recognises; the value is the placeholder written instead."""

    EMAIL = "[EMAIL]"
    PHONE = "[PHONE]"
    ID_NUMBER = "[ID]"


@dataclass(frozen=True)
class TextSpec:
    """How to read a text dataset, and what to mask (None: no masking)."""

    format: TextFormat
    text_column: str = "text"
    label_column: str = "label"
    mask: frozenset[PiiKind] | None = None


@dataclass
class TextDatasetSummary:
    """What a validated text dataset holds."""

    row_count: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    masked: dict[PiiKind, int] = field(default_factory=dict)
    rows_masked: int = 0


_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# Mainland China resident identity number (17 digits and a check character), US SSN.
_NATIONAL_ID = re.compile(r"(?<![\w])(?:\d{17}[\dXx]|\d{3}-\d{2}-\d{4})(?![\w])")
# 13-19 digits, optionally grouped by spaces or dashes: bank cards (kept only if the Luhn check passes).
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
# Phone numbers: an optional +country code, optional (area), then groups of digits; 9-15 digits in all.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?![\w])")
_DATE_LIKE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{4}$")
_DOTTED_QUAD = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_phone(span: str) -> bool:
    digits = sum(ch.isdigit() for ch in span)
    if not 9 <= digits <= 15:
        return False
    return not (_DATE_LIKE.match(span) or _DOTTED_QUAD.match(span))


def mask_text(text: str, kinds: frozenset[PiiKind]) -> tuple[str, dict[PiiKind, int]]:
    """``text`` with each recognised span of ``kinds`` replaced by its placeholder, and the counts per kind."""
    counts: dict[PiiKind, int] = {}

    def substitute(pattern: re.Pattern[str], kind: PiiKind, keep: Callable[[str], bool], value: str) -> str:
        def replace(match: re.Match[str]) -> str:
            if not keep(match.group(0)):
                return match.group(0)
            counts[kind] = counts.get(kind, 0) + 1
            return kind.value

        return pattern.sub(replace, value)

    if PiiKind.EMAIL in kinds:
        text = substitute(_EMAIL, PiiKind.EMAIL, lambda _: True, text)
    if PiiKind.ID_NUMBER in kinds:
        text = substitute(_NATIONAL_ID, PiiKind.ID_NUMBER, lambda _: True, text)
        text = substitute(_CARD, PiiKind.ID_NUMBER, lambda s: _luhn(re.sub(r"\D", "", s)), text)
    if PiiKind.PHONE in kinds:
        text = substitute(_PHONE, PiiKind.PHONE, _is_phone, text)
    return text, counts


class TextDatasetProcessor:
    """Validates (and masks) a text dataset fed in arbitrary byte chunks; ``feed`` and ``finish`` return the bytes
    to store: the input as it was, except records whose text was masked, which are re-encoded."""

    def __init__(self, spec: TextSpec) -> None:
        self._spec = spec
        self.summary = TextDatasetSummary()
        self._partial = bytearray()
        self._pending: list[bytes] = []  # lines of a CSV record whose quoted field spans lines
        self._pending_quotes = 0
        self._line = 0  # physical lines consumed
        self._record_start = 1
        self._columns: tuple[int, int] | None = None
        self._width = 0
        self._started = False

    # -- streaming ---------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._partial += data[start:]
                if len(self._partial) > MAX_RECORD_BYTES:
                    raise InvalidArgument(f"line {self._line + 1}: longer than {MAX_RECORD_BYTES} bytes")
                return bytes(out)
            if self._partial:
                self._partial += data[start : end + 1]
                line = bytes(self._partial)
                self._partial.clear()
            else:
                line = data[start : end + 1]
            out += self._physical_line(line)
            start = end + 1

    def finish(self) -> bytes:
        """Validates the end of the content (InvalidArgument when it is not a dataset) and returns the last bytes
        to store (a final line without a newline); ``summary`` is then complete."""
        out = b""
        if self._partial:
            line = bytes(self._partial)
            self._partial.clear()
            out = self._physical_line(line)
        if self._pending:
            raise InvalidArgument(f"line {self._record_start}: a quoted field is never closed")
        if self._spec.format is TextFormat.CSV and self._columns is None:
            raise InvalidArgument("the CSV has no header row")
        if self.summary.row_count == 0:
            raise InvalidArgument("the dataset has no data rows")
        return out

    def _physical_line(self, line: bytes) -> bytes:
        self._line += 1
        if self._line == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if self._spec.format is TextFormat.JSONL:
            return self._jsonl(line)
        if not self._pending:
            self._record_start = self._line
        self._pending.append(line)
        self._pending_quotes += line.count(b'"')
        if sum(len(p) for p in self._pending) > MAX_RECORD_BYTES:
            raise InvalidArgument(f"line {self._record_start}: record longer than {MAX_RECORD_BYTES} bytes")
        if self._pending_quotes % 2:
            return b""  # inside a quoted field: the record goes on on the next line
        record = b"".join(self._pending)
        self._pending.clear()
        self._pending_quotes = 0
        return self._csv(record)

    # -- records -----------------------------------------------------------------------------------------

    def _decode(self, raw: bytes, line: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"line {line}: not valid UTF-8") from None

    def _csv(self, raw: bytes) -> bytes:
        line = self._record_start
        text = self._decode(raw, line)
        if not text.strip():
            return raw  # blank lines carry no record
        try:
            fields = next(csv.reader([text], strict=True))
        except (csv.Error, StopIteration) as exc:
            raise InvalidArgument(f"line {line}: malformed CSV ({exc})") from None
        if self._columns is None:
            names = [name.strip() for name in fields]
            missing = [c for c in (self._spec.text_column, self._spec.label_column) if c not in names]
            if missing:
                raise InvalidArgument(f"the CSV header has no column {', '.join(map(repr, missing))} (has {names})")
            self._columns = (names.index(self._spec.text_column), names.index(self._spec.label_column))
            self._width = len(names)
            return raw
        if len(fields) != self._width:
            raise InvalidArgument(f"line {line}: {len(fields)} fields, the header has {self._width}")
        text_index, label_index = self._columns
        masked = self._row(fields[text_index], fields[label_index], line)
        if masked is None:
            return raw
        fields[text_index] = masked
        buffer = io.StringIO()
        ending = "\r\n" if text.endswith("\r\n") else "\n" if text.endswith("\n") else ""
        csv.writer(buffer, lineterminator=ending).writerow(fields)
        return buffer.getvalue().encode("utf-8")

    def _jsonl(self, raw: bytes) -> bytes:
        line = self._line
        text = self._decode(raw, line)
        if not text.strip():
            return raw
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"line {line}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InvalidArgument(f"line {line}: not a JSON object")
        spec = self._spec
        for column in (spec.text_column, spec.label_column):
            if column not in record:
                raise InvalidArgument(f"line {line}: no key {column!r}")
        value, label = record[spec.text_column], record[spec.label_column]
        if not isinstance(value, str):
            raise InvalidArgument(f"line {line}: {spec.text_column!r} must be a string")
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise InvalidArgument(f"line {line}: {spec.label_column!r} must be a string or an integer")
        masked = self._row(value, str(label), line)
        if masked is None:
            return raw
        record[spec.text_column] = masked
        ending = "\n" if text.endswith("\n") else ""
        return (json.dumps(record, ensure_ascii=False) + ending).encode("utf-8")

    def _row(self, text: str, label: str, line: int) -> str | None:
        """Counts the row; the masked text if masking changed it, else None."""
        if not text.strip():
            raise InvalidArgument(f"line {line}: empty {self._spec.text_column!r}")
        label = label.strip()
        if not label:
            raise InvalidArgument(f"line {line}: empty {self._spec.label_column!r}")
        if len(label) > _MAX_LABEL_CHARS:
            raise InvalidArgument(f"line {line}: label longer than {_MAX_LABEL_CHARS} characters")
        summary = self.summary
        summary.row_count += 1
        if label not in summary.labels and len(summary.labels) >= MAX_LABELS:
            raise InvalidArgument(f"line {line}: more than {MAX_LABELS} distinct labels")
        summary.labels[label] = summary.labels.get(label, 0) + 1
        if self._spec.mask is None:
            return None
        masked, counts = mask_text(text, self._spec.mask)
        if not counts:
            return None
        summary.rows_masked += 1
        for kind, n in counts.items():
            summary.masked[kind] = summary.masked.get(kind, 0) + n
        return masked
