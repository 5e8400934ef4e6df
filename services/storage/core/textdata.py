"""Text-classification datasets (CSV with a header row, or JSON Lines) checked while they stream in: the text
and label columns are present, every row has a non-empty text and label; the row count and label set are
recorded. Optionally personal data in the text column is masked or pseudonymized (services.storage.core.pii), and
the masked spans are counted.

The content is processed record by record, so memory stays bounded by the longest record, whatever the size
of the dataset.
"""

from __future__ import annotations

import csv
import enum
import io
import json
from dataclasses import dataclass, field

from services.mesh.errors import InvalidArgument
from services.storage.core.pii import MaskingSpec, PiiKind, PiiMasker, Pseudonymizer

__all__ = [
    "TextFormat",
    "TextSpec",
    "TextDatasetSummary",
    "TextDatasetProcessor",
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


@dataclass(frozen=True)
class TextSpec:
    """How to read a text dataset, and what to mask (None: no masking)."""

    format: TextFormat
    text_column: str = "text"
    label_column: str = "label"
    mask: MaskingSpec | None = None


@dataclass
class TextDatasetSummary:
    """What a validated text dataset holds."""

    row_count: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    masked: dict[PiiKind, int] = field(default_factory=dict)
    rows_masked: int = 0


class TextDatasetProcessor:
    """Validates (and masks) a text dataset fed in arbitrary byte chunks; ``feed`` and ``finish`` return the bytes
    to store: the input as it was, except records whose text was masked, which are re-encoded. Pseudonymization
    needs the tenant's ``pseudonymizer``."""

    def __init__(self, spec: TextSpec, pseudonymizer: Pseudonymizer | None = None) -> None:
        self._spec = spec
        self._masker = PiiMasker(spec.mask, pseudonymizer) if spec.mask is not None else None
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
        if self._masker is None:
            return None
        masked, counts = self._masker.mask(text)
        if not counts:
            return None
        summary.rows_masked += 1
        for kind, n in counts.items():
            summary.masked[kind] = summary.masked.get(kind, 0) + n
        return masked
