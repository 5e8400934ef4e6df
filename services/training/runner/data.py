"""Text classification data: read CSV/JSONL from a DatasetSource as it streams, split it by seed, tokenize and batch
it. A dataset is never held in memory: its texts and then its token ids go to unnamed files in the job's scratch
directory; memory holds an offset and a label per example.

Importing this module does not import torch (the service validates jobs with it); batching does."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import mmap
import random
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

__all__ = [
    "Batch",
    "BytesSource",
    "DatasetSource",
    "DatasetSummary",
    "EncodedExamples",
    "LocalFileSource",
    "StagedDataset",
    "TextExample",
    "check_split",
    "collate",
    "encode",
    "epoch_batches",
    "poisson_batches",
    "resolve_labels",
    "split",
    "stage_dataset",
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


class StagedDataset:
    """A dataset parsed as it streamed in: its lineage, and its examples on disk. The texts are one UTF-8 file;
    memory holds a byte offset and a label per example, so a dataset larger than the runner's memory is trained on.
    The file has no name (it is gone with the process, however the process ends); ``scratch`` is where it and the
    token ids of its examples (encode) live."""

    def __init__(
        self,
        summary: DatasetSummary,
        label_names: tuple[str, ...],
        labels: array[int],
        offsets: array[int],
        texts: memoryview,
        scratch: Path,
    ) -> None:
        self.summary = summary  # the lineage
        self.label_names = label_names  # in order of first appearance
        self._labels = labels  # index into label_names, per example
        self._offsets = offsets  # where each example's text starts in texts, and where the last one ends
        self._texts = texts
        self.scratch = scratch

    def __len__(self) -> int:
        return len(self._labels)

    def label(self, index: int) -> str:
        return self.label_names[self._labels[index]]

    def text(self, index: int) -> str:
        return bytes(self._texts[self._offsets[index] : self._offsets[index + 1]]).decode("utf-8")

    def text_size(self, index: int) -> int:
        """The text's size in bytes (UTF-8)."""
        return self._offsets[index + 1] - self._offsets[index]


def stage_dataset(source: DatasetSource, text_column: str, label_column: str, scratch: Path) -> StagedDataset:
    """Parse the source as it streams (hashing it on the way), writing the examples' texts to a file in ``scratch``;
    neither the source's bytes nor its texts are ever held whole. ValueError for unusable data, as
    summarize_dataset."""
    raw, fmt, lines = _open(source)
    scratch.mkdir(parents=True, exist_ok=True)
    names: dict[str, int] = {}
    counts: Counter[str] = Counter()
    labels, offsets, skipped = array("i"), array("q", [0]), 0
    with _unnamed_file(scratch) as out:
        for example in _examples(lines, fmt, text_column, label_column):
            if example is None:
                skipped += 1
                continue
            labels.append(names.setdefault(example.label, len(names)))
            counts[example.label] += 1
            offsets.append(offsets[-1] + out.write(example.text.encode("utf-8")))
        if not labels:
            raise ValueError(f"dataset {source.name} is empty: no rows with both text and a label")
        texts = _mapped(out)
    summary = DatasetSummary(source.name, fmt, raw.digest.hexdigest(), raw.size, dict(counts), skipped)
    return StagedDataset(summary, tuple(names), labels, offsets, texts, scratch)


def _unnamed_file(directory: Path) -> IO[bytes]:
    """A new file in ``directory`` that no other process can open and no crash leaves behind (O_TMPFILE, or a file
    unlinked once made), buffered for writing."""
    return tempfile.TemporaryFile("w+b", buffering=_READ_BYTES, dir=directory)


def _mapped(f: IO[bytes]) -> memoryview:
    """What was written to ``f``, mapped read-only: pages come from the page cache as they are read, not from the
    heap. The mapping keeps the file alive after ``f`` is closed."""
    f.flush()
    if f.seek(0, io.SEEK_END) == 0:
        return memoryview(b"")
    return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


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


def split(dataset: StagedDataset, eval_fraction: float, seed: int) -> tuple[array[int], array[int]]:
    """A stratified, seed-determined train/eval split (each label keeps its share in both parts): the indices of
    the train examples and of the held-out ones, each in the dataset's order."""
    by_label: dict[str, array[int]] = {}
    for index in range(len(dataset)):
        by_label.setdefault(dataset.label(index), array("q")).append(index)
    check_split({label: len(ids) for label, ids in by_label.items()}, eval_fraction)
    rng = random.Random(f"split:{seed}")
    held_out = bytearray(len(dataset))
    for label in sorted(by_label):
        ids = by_label[label]
        rng.shuffle(ids)
        for index in ids[: _held_out(len(ids), eval_fraction)]:
            held_out[index] = 1
    del by_label
    train = array("q", (i for i, held in enumerate(held_out) if not held))
    return train, array("q", (i for i, held in enumerate(held_out) if held))


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


#: Examples tokenized at a time, at most; and at most this many bytes of text (the tokenizer's output for a batch,
#: before truncation, takes tens of bytes per byte of text).
_ENCODE_BATCH = 1024
_ENCODE_BYTES = 256 * 1024


class EncodedExamples:
    """Token ids (truncated, unpadded) and class indices. The ids are a file of int32s, mapped read-only; memory
    holds an offset and a label per example."""

    def __init__(self, ids: memoryview, offsets: array[int], labels: array[int]) -> None:
        self._ids = ids.cast("i")
        self._offsets = offsets
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def input_ids(self, index: int) -> list[int]:
        return self._ids[self._offsets[index] : self._offsets[index + 1]].tolist()

    def length(self, index: int) -> int:
        return self._offsets[index + 1] - self._offsets[index]


def encode(
    tokenizer: Any,
    dataset: StagedDataset,
    indices: Sequence[int],
    label2id: dict[str, int],
    max_length: int,
) -> EncodedExamples:
    """Tokenize the chosen examples with the model's tokenizer, a batch at a time, into a file in the dataset's
    scratch directory; padding happens per batch in collate."""
    offsets, labels = array("q", [0]), array("i")
    with _unnamed_file(dataset.scratch) as out:
        start = 0
        while start < len(indices):
            end, size = start, 0
            while end < len(indices) and end - start < _ENCODE_BATCH and (size < _ENCODE_BYTES or end == start):
                size += dataset.text_size(indices[end])
                end += 1
            chunk = indices[start:end]
            encoded = tokenizer([dataset.text(i) for i in chunk], truncation=True, max_length=max_length, padding=False)
            for ids in encoded["input_ids"]:
                array("i", ids).tofile(out)
                offsets.append(offsets[-1] + len(ids))
            labels.extend(label2id[dataset.label(i)] for i in chunk)
            start = end
        ids = _mapped(out)
    return EncodedExamples(ids, offsets, labels)


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

    seqs = [data.input_ids(i) for i in indices]
    length = pad_to if pad_to is not None else max((len(s) for s in seqs), default=1)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    labels = torch.tensor([data.labels[i] for i in indices], dtype=torch.long)
    return Batch(ids, mask, labels)


def epoch_batches(count: int, batch_size: int, seed: int, epoch: int) -> list[Sequence[int]]:
    """The shuffled batches of one epoch, a function of (seed, epoch) only, so a resumed run sees the same ones."""
    order = array("q", range(count))
    random.Random(f"epoch:{seed}:{epoch}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, count, batch_size)]


def poisson_batches(count: int, sample_rate: float, steps: int, seed: int, epoch: int) -> list[Sequence[int]]:
    """Poisson-sampled batches (each example in each batch with probability sample_rate), as DP-SGD's
    accounting assumes; also a function of (seed, epoch) only. Batches may be empty."""
    import torch

    generator = torch.Generator().manual_seed(_hash_seed(seed, epoch))
    out: list[Sequence[int]] = []
    for _ in range(steps):
        mask = torch.rand(count, generator=generator) < sample_rate
        out.append(mask.nonzero().flatten().tolist())
    return out


def _hash_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)
