"""Text classification data: read CSV/JSONL from a DatasetSource, split it by seed, tokenize and batch it.

Importing this module does not import torch (the service validates jobs with it); batching does."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

__all__ = [
    "Batch",
    "BytesSource",
    "DatasetSource",
    "DatasetSummary",
    "EncodedExamples",
    "LoadedDataset",
    "LocalFileSource",
    "TextExample",
    "check_split",
    "collate",
    "encode",
    "epoch_batches",
    "load_dataset",
    "parse_examples",
    "poisson_batches",
    "resolve_labels",
    "split_examples",
    "summarize_dataset",
]


#: Bytes the parser reads from a source at a time.
_READ_BYTES = 1 << 20


class DatasetSource(Protocol):
    """Where a dataset's bytes come from: a local file here, the storage service's download stream later."""

    @property
    def name(self) -> str:
        """A file-like name (its suffix, .csv or .jsonl, picks the format) recorded in the job's lineage."""
        ...

    def chunks(self) -> Iterable[bytes]:
        """The dataset's bytes, in order."""
        ...


@dataclass(frozen=True)
class LocalFileSource:
    """A dataset file on the local disk."""

    path: Path
    chunk_size: int = 1 << 20

    @property
    def name(self) -> str:
        return self.path.name

    def chunks(self) -> Iterator[bytes]:
        if not self.path.is_file():
            raise ValueError(f"dataset {self.path} does not exist")
        with self.path.open("rb") as f:
            while chunk := f.read(self.chunk_size):
                yield chunk


@dataclass(frozen=True)
class BytesSource:
    """A dataset already in memory."""

    name: str
    data: bytes

    def chunks(self) -> Iterator[bytes]:
        yield self.data


@dataclass(frozen=True)
class TextExample:
    text: str
    label: str


@dataclass(frozen=True)
class LoadedDataset:
    """Parsed examples plus the lineage of the bytes they came from."""

    name: str
    format: str
    sha256: str
    size_bytes: int
    examples: tuple[TextExample, ...]
    rows_skipped: int


def load_dataset(source: DatasetSource, text_column: str, label_column: str) -> LoadedDataset:
    """Parse the source as it streams (hashing it on the way: neither its bytes nor its text are ever held whole,
    only the examples); ValueError for unusable data."""
    raw, fmt, lines = _open(source)
    examples, skipped = parse_examples(lines, fmt, text_column, label_column)
    if not examples:
        raise ValueError(f"dataset {source.name} is empty: no rows with both text and a label")
    return LoadedDataset(source.name, fmt, raw.digest.hexdigest(), raw.size, tuple(examples), skipped)


@dataclass(frozen=True)
class DatasetSummary:
    """What checking a job needs of its dataset, without its examples: the lineage and the count of each label."""

    name: str
    format: str
    sha256: str
    size_bytes: int
    label_counts: dict[str, int]
    rows_skipped: int

    @property
    def examples(self) -> int:
        return sum(self.label_counts.values())


def summarize_dataset(source: DatasetSource, text_column: str, label_column: str) -> DatasetSummary:
    """load_dataset's checks and lineage in memory bounded whatever the dataset's size (the examples are counted,
    not kept); the same ValueErrors."""
    raw, fmt, lines = _open(source)
    counts: Counter[str] = Counter()
    skipped = 0
    for example in _examples(lines, fmt, text_column, label_column):
        if example is None:
            skipped += 1
        else:
            counts[example.label] += 1
    if not counts:
        raise ValueError(f"dataset {source.name} is empty: no rows with both text and a label")
    return DatasetSummary(source.name, fmt, raw.digest.hexdigest(), raw.size, dict(counts), skipped)


def _open(source: DatasetSource) -> tuple[_HashingReader, str, io.TextIOWrapper]:
    """The source as text lines (newline=""), its format, and the reader that hashes and counts its bytes."""
    raw = _HashingReader(source.chunks())
    buffered = io.BufferedReader(raw, buffer_size=_READ_BYTES)
    fmt = _detect_format(source.name, buffered.peek(_READ_BYTES))
    # Real exports carry the odd invalid byte (the tweets corpus does): keep the row, replace the byte.
    return raw, fmt, io.TextIOWrapper(buffered, encoding="utf-8-sig", errors="replace", newline="")


class _HashingReader(io.RawIOBase):
    """A source's chunks as a readable stream, hashed and counted as they are read."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self.digest.update(chunk)
            self.size += len(chunk)
            self._pending = memoryview(chunk)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


def _detect_format(name: str, head: bytes) -> str:
    lowered = name.lower()
    if lowered.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if lowered.endswith((".csv", ".tsv")):
        return "csv"
    return "jsonl" if head.lstrip()[:1] == b"{" else "csv"


def parse_examples(
    lines: Iterable[str], fmt: str, text_column: str, label_column: str
) -> tuple[list[TextExample], int]:
    """Examples of the text's lines (as a text file with newline="" yields them) and the number of rows skipped
    for a blank text or label; missing columns raise ValueError."""
    examples: list[TextExample] = []
    skipped = 0
    for example in _examples(lines, fmt, text_column, label_column):
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    return examples, skipped


def _examples(lines: Iterable[str], fmt: str, text_column: str, label_column: str) -> Iterator[TextExample | None]:
    """Each row's example, None for a row skipped for a blank text or label."""
    rows = _csv_rows(lines) if fmt == "csv" else _jsonl_rows(lines)
    checked_columns = False
    for line, row in rows:
        if not checked_columns:
            missing = [c for c in (text_column, label_column) if c not in row]
            if missing:
                raise ValueError(
                    f"dataset has no column(s) {', '.join(repr(m) for m in missing)}; columns are {sorted(row)}"
                )
            checked_columns = True
        if text_column not in row or label_column not in row:
            raise ValueError(f"dataset line {line} lacks column {text_column!r} or {label_column!r}")
        value, label = row[text_column], row[label_column]
        if not isinstance(value, str):
            raise ValueError(f"dataset line {line}: {text_column!r} must be text (got {value!r})")
        label_text = "" if label is None else str(label).strip()
        yield TextExample(value, label_text) if value.strip() and label_text else None


def _csv_rows(lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(lines)
    if reader.fieldnames is None:
        return
    for row in reader:
        yield reader.line_num, {k: v for k, v in row.items() if k is not None}


def _jsonl_rows(lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"dataset line {number} is not JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise ValueError(f"dataset line {number} is not a JSON object")
        yield number, row


def resolve_labels(labels: Iterable[str], declared: Sequence[str]) -> tuple[str, ...]:
    """The class list: the declared one (every label of the dataset's examples must be in it) or the dataset's,
    sorted."""
    present = sorted(set(labels))
    if declared:
        unknown = [label for label in present if label not in declared]
        if unknown:
            raise ValueError(f"dataset has label value(s) {unknown} that are not in the spec's labels {list(declared)}")
        return tuple(declared)
    if len(present) < 2:
        raise ValueError(f"dataset has {len(present)} distinct label(s) {present}; classification needs at least 2")
    return tuple(present)


def split_examples(
    examples: Sequence[TextExample], eval_fraction: float, seed: int
) -> tuple[list[TextExample], list[TextExample]]:
    """A stratified, seed-determined train/eval split (each label keeps its share in both parts)."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        by_label[example.label].append(index)
    rng = random.Random(f"split:{seed}")
    eval_ids: set[int] = set()
    for label in sorted(by_label):
        ids = by_label[label]
        rng.shuffle(ids)
        eval_ids.update(ids[: _held_out(len(ids), eval_fraction)])
    train = [e for i, e in enumerate(examples) if i not in eval_ids]
    held_out = [e for i, e in enumerate(examples) if i in eval_ids]
    check_split({label: len(ids) for label, ids in by_label.items()}, eval_fraction)
    return train, held_out


def check_split(label_counts: dict[str, int], eval_fraction: float) -> None:
    """ValueError unless split_examples of examples with these label counts leaves both parts non-empty."""
    held_out = sum(_held_out(count, eval_fraction) for count in label_counts.values())
    total = sum(label_counts.values())
    if not 0 < held_out < total:
        raise ValueError(
            f"dataset of {total} example(s) is too small to split into train and eval at eval_fraction {eval_fraction}"
        )


def _held_out(count: int, eval_fraction: float) -> int:
    """How many of a label's ``count`` examples the split holds out."""
    held = round(count * eval_fraction)
    return 1 if held == 0 and count >= 2 else held


@dataclass(frozen=True)
class EncodedExamples:
    """Token ids (truncated, unpadded) and class indices."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def encode(
    tokenizer: Any, examples: Sequence[TextExample], label2id: dict[str, int], max_length: int
) -> EncodedExamples:
    """Tokenize with the model's tokenizer; padding happens per batch in collate."""
    if not examples:
        return EncodedExamples([], [])
    ids = tokenizer([e.text for e in examples], truncation=True, max_length=max_length, padding=False)["input_ids"]
    return EncodedExamples([list(x) for x in ids], [label2id[e.label] for e in examples])


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


def collate(data: EncodedExamples, indices: Sequence[int], pad_id: int, pad_to: int | None = None) -> Batch:
    """Pad the chosen examples to the longest of them (or to pad_to)."""
    import torch

    seqs = [data.input_ids[i] for i in indices]
    length = pad_to if pad_to is not None else max((len(s) for s in seqs), default=1)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    labels = torch.tensor([data.labels[i] for i in indices], dtype=torch.long)
    return Batch(ids, mask, labels)


def epoch_batches(count: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch, a function of (seed, epoch) only, so a resumed run sees the same ones."""
    order = list(range(count))
    random.Random(f"epoch:{seed}:{epoch}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, count, batch_size)]


def poisson_batches(count: int, sample_rate: float, steps: int, seed: int, epoch: int) -> list[list[int]]:
    """Poisson-sampled batches (each example in each batch with probability sample_rate), as DP-SGD's
    accounting assumes; also a function of (seed, epoch) only. Batches may be empty."""
    import torch

    generator = torch.Generator().manual_seed(_hash_seed(seed, epoch))
    out = []
    for _ in range(steps):
        mask = torch.rand(count, generator=generator) < sample_rate
        out.append(mask.nonzero().flatten().tolist())
    return out


def _hash_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)
