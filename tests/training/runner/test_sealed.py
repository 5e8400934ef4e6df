"""A job's dataset sealed at rest in its directory (services/training/runner/sealed.py): it reads back exactly, and a
file changed, cut short, extended or opened with another job's key refuses to open, handing on nothing of the segment
that failed."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from services.mesh.segments import HEADER_BYTES, TAG_BYTES
from services.training.runner.data import LocalFileSource
from services.training.runner.sealed import (
    KEY_ENV,
    SealedFileSource,
    SealedFileWriter,
    dataset_source,
    job_data_key,
    key_env,
)

_SEGMENT = 1 << 20
_FIRST_PLAIN = _SEGMENT - HEADER_BYTES - TAG_BYTES


def _seal(path: Path, data: bytes, key: bytes, piece: int = 300_001) -> Path:
    writer = SealedFileWriter(path.with_suffix(".part"), key)
    for offset in range(0, len(data), piece):
        writer.write(data[offset : offset + piece])
    writer.finish()
    path.with_suffix(".part").rename(path)
    return path


@pytest.mark.parametrize(
    "size", [0, 1, _FIRST_PLAIN, _FIRST_PLAIN + 1, _FIRST_PLAIN + _SEGMENT - TAG_BYTES, 3 * _SEGMENT + 12_345]
)
def test_what_is_sealed_reads_back_exactly_and_is_not_stored_in_the_clear(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    key = os.urandom(32)
    sealed = _seal(tmp_path / "dataset.csv.sealed", data, key)
    source = SealedFileSource(sealed, key)
    assert source.name == "dataset.csv"
    chunks = list(source.chunks())
    assert b"".join(chunks) == data
    assert all(len(chunk) <= _SEGMENT for chunk in chunks)
    if size >= 64:
        assert data[:64] not in sealed.read_bytes()


def test_a_dataset_row_is_never_in_the_file(tmp_path: Path) -> None:
    row = b"text,label\nthe tenant's secret sentence,positive\n"
    sealed = _seal(tmp_path / "dataset.csv.sealed", row * 50_000, os.urandom(32))
    assert b"secret sentence" not in sealed.read_bytes()


def _damaged(tmp_path: Path, damage: str) -> tuple[Path, bytes, bytes]:
    data = os.urandom(3 * _SEGMENT)
    key = os.urandom(32)
    sealed = _seal(tmp_path / "dataset.csv.sealed", data, key)
    stored = bytearray(sealed.read_bytes())
    if damage == "flipped":
        stored[2 * _SEGMENT + 100] ^= 1  # in segment 2
    elif damage == "cut at a segment boundary":
        del stored[3 * _SEGMENT :]
    elif damage == "cut inside a segment":
        del stored[-100:]
    elif damage == "extended":
        stored += os.urandom(TAG_BYTES + 10)
    elif damage == "segments swapped":
        stored[_SEGMENT : 2 * _SEGMENT], stored[2 * _SEGMENT : 3 * _SEGMENT] = (
            stored[2 * _SEGMENT : 3 * _SEGMENT],
            stored[_SEGMENT : 2 * _SEGMENT],
        )
    sealed.write_bytes(bytes(stored))
    return sealed, data, key


@pytest.mark.parametrize(
    "damage", ["flipped", "cut at a segment boundary", "cut inside a segment", "extended", "segments swapped"]
)
def test_a_damaged_file_refuses_to_open_and_hands_on_no_byte_of_the_failed_segment(tmp_path: Path, damage: str) -> None:
    sealed, data, key = _damaged(tmp_path, damage)
    read = bytearray()
    with pytest.raises(ValueError, match="does not open with the job's key|is damaged"):
        for chunk in SealedFileSource(sealed, key).chunks():
            read += chunk
    assert data.startswith(bytes(read))  # what came out came out right, before the failure
    assert len(read) < len(data)


def test_another_jobs_key_opens_nothing(tmp_path: Path) -> None:
    master = os.urandom(32)
    mine, theirs = job_data_key(master, "job-a"), job_data_key(master, "job-b")
    assert mine != theirs and len(mine) == 32 and job_data_key(master, "job-a") == mine
    sealed = _seal(tmp_path / "dataset.jsonl.sealed", b'{"text": "x", "label": "y"}\n' * 10, mine)
    with pytest.raises(ValueError, match="does not open with the job's key"):
        list(SealedFileSource(sealed, theirs).chunks())


def test_the_runner_opens_a_sealed_dataset_with_its_key_and_a_plain_one_as_it_is(tmp_path: Path) -> None:
    key = os.urandom(32)
    sealed = _seal(tmp_path / "dataset.csv.sealed", b"text,label\na,b\n", key)
    source = dataset_source(sealed, key_env(key))
    assert isinstance(source, SealedFileSource) and b"".join(source.chunks()) == b"text,label\na,b\n"
    assert key_env(key) == {KEY_ENV: base64.b64encode(key).decode()}
    with pytest.raises(ValueError, match=KEY_ENV):
        dataset_source(sealed, {})
    plain = tmp_path / "old.csv"
    plain.write_bytes(b"text,label\na,b\n")
    assert dataset_source(plain, {}) == LocalFileSource(plain)
