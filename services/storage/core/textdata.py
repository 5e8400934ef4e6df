"""Text-classification datasets (CSV with a header row, or JSON Lines) checked while they stream in: the text
and label columns are present, every row has a non-empty text and label; the row count and label set are
recorded. Optionally personal data in the text column is masked or pseudonymized (services.storage.core.pii), and
the masked spans are counted.

Unmasked content is stored exactly as it arrives and checked in blocks of whole records (at most
MAX_RECORD_BYTES each, so no record in one can be too long). A CSV block after the header goes through Arrow's C++
reader (which holds no GIL while it parses, so the upload's other stages go on), with the checks as Arrow compute
kernels; where Arrow might read a block other than Python's strict ``csv`` reader does (a quote that is not a quoted
field's, a lone carriage return, a field beyond ``csv``'s size limit), or finds anything wrong, the block goes
to one UTF-8 decode and one run of the C ``csv`` reader (or ``json.loads`` per line) with the checks as C-level
passes over its rows; a block with anything irregular is checked again line by line, which finds the exact line and
message. Each path accepts exactly what the next one would, so a dataset's outcome never depends on which decided.
Masked content goes line by line (the masker rewrites single records). Either way memory stays bounded by a block or
the longest record, whatever the size of the dataset.
"""

from __future__ import annotations

import csv
import enum
import io
import json
import re
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import itemgetter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

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
_BOM = b"\xef\xbb\xbf"
_SEARCH_STEP = 64 * 1024
#: What str.strip() strips (str.isspace): Arrow's trims are given exactly these, to decide blank texts and labels
#: as Python does.
_WHITE_SPACE = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
#: Blocks whose every quote belongs to a quoted field as Python's strict reader takes one: it opens at a record's or
#: field's start, doubles inside, and closes right before a delimiter or a line's end. Arrow reads other quotes
#: leniently (text after a closing quote is appended, where Python's strict reader refuses the record).
_PLAIN_QUOTING = re.compile(rb'(?:[^"]*+(?<![^,\n])"(?:[^"]++|"")*+"(?=[,\r\n]|\Z))*+[^"]*+')


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
        self._carry = bytearray()  # unmasked content not checked yet: from a record's start
        self._searched = 0  # the carry's size when a record's end was last looked for
        self._pending_bytes = 0
        self._head: bytearray | None = bytearray()  # the first bytes, until a byte-order mark can be told

    # -- streaming ---------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        if self._masker is not None:
            return self._feed_lines(data)
        self._carry += data
        self._check_carry(final=False)
        return self._unchanged(data)

    def _unchanged(self, data: bytes) -> bytes:
        """What to store of unmasked input: all of it, but for a leading byte-order mark."""
        if self._head is None:
            return data
        self._head += data
        if len(self._head) < len(_BOM) and data:
            return b""
        head, self._head = bytes(self._head), None
        return head.removeprefix(_BOM)

    def _feed_lines(self, data: bytes) -> bytes:
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
        if self._masker is None:
            self._check_carry(final=True)
            out = self._unchanged(b"")
        if self._partial:  # a last line without a newline, checked line by line
            line = bytes(self._partial)
            self._partial.clear()
            last = self._physical_line(line)
            if self._masker is not None:  # unmasked, it was stored as it came: storing it again would add it twice
                out = last
        if self._pending:
            raise InvalidArgument(f"line {self._record_start}: a quoted field is never closed")
        if self._spec.format is TextFormat.CSV and self._columns is None:
            raise InvalidArgument("the CSV has no header row")
        if self.summary.row_count == 0:
            raise InvalidArgument("the dataset has no data rows")
        return out

    # -- blocks of unmasked records ------------------------------------------------------------------------

    def _check_carry(self, final: bool) -> None:
        carry = self._carry
        # Looking for the end of the last record costs a pass over the carry: only after it grew by a good step.
        if not final and len(carry) < self._searched + _SEARCH_STEP:
            return
        while carry:
            self._searched = len(carry)
            cut = self._records_end(carry)
            if not cut:
                if len(carry) > MAX_RECORD_BYTES or final:
                    # A record too long (the line path says which and raises), or the last one, without newline.
                    self._check_block(bytes(carry))
                    carry.clear()
                return
            self._check_block(bytes(carry[:cut]))
            del carry[:cut]
        self._searched = len(carry)

    def _records_end(self, carry: bytearray) -> int:
        """The end of the last whole record within the first MAX_RECORD_BYTES of ``carry`` (0: none)."""
        limit = MAX_RECORD_BYTES + (1 if self._spec.format is TextFormat.JSONL else 0)
        end = carry.rfind(b"\n", 0, limit)
        if end < 0 or self._spec.format is TextFormat.JSONL or carry.count(b'"', 0, end) % 2 == 0:
            return end + 1
        # That newline is inside a quoted field. A newline ends a record where an even number of quotes precede it:
        # between the (2j)th and (2j+1)th quote. Walk back over such stretches, last first (quote by quote, so a
        # long quoted field of many lines costs one step).
        high = carry.rfind(b'"', 0, end)  # an odd number of quotes before `end`: this one opens the field
        while high >= 0:
            low = carry.rfind(b'"', 0, high)
            newline = carry.rfind(b"\n", low + 1, high)
            if newline >= 0:
                return newline + 1
            if low < 0:
                return 0
            high = carry.rfind(b'"', 0, low)
        return 0

    def _check_block(self, block: bytes) -> None:
        """Checks whole records (the last one may lack its newline at the end of the content) in one go, or line
        by line where anything is irregular."""
        lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
        if len(block) <= MAX_RECORD_BYTES + 1:
            raw = block[len(_BOM) :] if self._line == 0 and block.startswith(_BOM) else block
            checked = self._spec.format is TextFormat.CSV and self._arrow_block(raw)
            if not checked:
                try:
                    text = raw.decode("utf-8")
                    checked = self._csv_block(text) if self._spec.format is TextFormat.CSV else self._jsonl_block(text)
                except (UnicodeDecodeError, csv.Error, ValueError, LookupError, RecursionError, TypeError):
                    checked = False
            if checked:
                self._line += lines
                return
        self._feed_lines(block)

    def _arrow_block(self, block: bytes) -> bool:
        """Checks a block of CSV records after the header with Arrow; False where the block is Python's to read."""
        if self._columns is None or _PLAIN_QUOTING.fullmatch(block) is None:
            return False
        if b"\r" in block and block.count(b"\r") != block.count(b"\r\n"):
            return False  # a lone carriage return ends a line for Arrow, and is malformed for Python
        names = [str(i) for i in range(self._width)]
        try:
            table = pa_csv.read_csv(
                pa.py_buffer(block),
                read_options=pa_csv.ReadOptions(use_threads=False, column_names=names, block_size=2 * len(block) + 1),
                parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                convert_options=pa_csv.ConvertOptions(
                    column_types=dict.fromkeys(names, pa.string()),  # UTF-8 checked
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
        except pa.ArrowInvalid:  # a record of another width, not UTF-8: Python's reader says which and where
            return False
        if any(pc.max(pc.binary_length(column)).as_py() > csv.field_size_limit() for column in table.columns):
            return False
        text_index, label_index = self._columns
        if pc.any(pc.equal(pc.utf8_length(pc.utf8_trim(table.column(text_index), _WHITE_SPACE)), 0)).as_py():
            return False
        labels = pc.value_counts(pc.utf8_trim(table.column(label_index), _WHITE_SPACE))
        return self._count(table.num_rows, {pair["values"]: pair["counts"] for pair in labels.to_pylist()})

    def _csv_block(self, text: str) -> bool:
        rows = list(filter(None, csv.reader(io.StringIO(text), strict=True)))  # blank lines give no row
        columns, width = self._columns, self._width
        if columns is None and rows:
            if len(rows[0]) == 1 and not rows[0][0].strip():
                return False  # a line of white space before the header: the line path skips it
            columns, width = self._header(rows[0])
            rows = rows[1:]
        if not rows:
            self._columns, self._width = columns, width
            return True
        if set(map(len, rows)) != {width} or columns is None:
            return False
        text_index, label_index = columns
        if not all(map(str.strip, map(itemgetter(text_index), rows))):
            return False
        if not self._count(len(rows), Counter(map(str.strip, map(itemgetter(label_index), rows)))):
            return False
        self._columns, self._width = columns, width
        return True

    def _jsonl_block(self, text: str) -> bool:
        records = list(map(json.loads, filter(str.strip, text.split("\n"))))
        if not records:
            return True
        if set(map(type, records)) != {dict}:
            return False
        pairs = list(map(itemgetter(self._spec.text_column, self._spec.label_column), records))
        values, labels = zip(*pairs, strict=True)
        if set(map(type, values)) != {str} or not set(map(type, labels)) <= {str, int}:
            return False
        if not all(map(str.strip, values)):
            return False
        return self._count(len(records), Counter(map(str.strip, map(str, labels))))

    def _count(self, rows: int, counted: Mapping[str, int]) -> bool:
        """Adds a block's rows and (stripped) labels to the summary, unless a label is empty, too long, or one too
        many."""
        known = self.summary.labels
        fresh = [label for label in counted if label not in known]
        if "" in counted or len(known) + len(fresh) > MAX_LABELS or any(len(f) > _MAX_LABEL_CHARS for f in fresh):
            return False
        self.summary.row_count += rows
        for label, n in counted.items():
            known[label] = known.get(label, 0) + n
        return True

    def _header(self, fields: list[str]) -> tuple[tuple[int, int], int]:
        names = [name.strip() for name in fields]
        missing = [c for c in (self._spec.text_column, self._spec.label_column) if c not in names]
        if missing:
            raise InvalidArgument(f"the CSV header has no column {', '.join(map(repr, missing))} (has {names})")
        return (names.index(self._spec.text_column), names.index(self._spec.label_column)), len(names)

    # -- line by line ------------------------------------------------------------------------------------

    def _physical_line(self, line: bytes) -> bytes:
        self._line += 1
        if self._line == 1 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        if self._spec.format is TextFormat.JSONL:
            return self._jsonl(line)
        if not self._pending:
            self._record_start = self._line
        self._pending.append(line)
        self._pending_quotes += line.count(b'"')
        self._pending_bytes += len(line)
        if self._pending_bytes > MAX_RECORD_BYTES:
            raise InvalidArgument(f"line {self._record_start}: record longer than {MAX_RECORD_BYTES} bytes")
        if self._pending_quotes % 2:
            return b""  # inside a quoted field: the record goes on on the next line
        record = b"".join(self._pending)
        self._pending.clear()
        self._pending_quotes = self._pending_bytes = 0
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
            self._columns, self._width = self._header(fields)
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
