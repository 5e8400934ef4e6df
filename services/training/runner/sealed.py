"""A job's dataset at rest in its directory: sealed under a key of that job, opened segment by segment as it is read.

The training service writes the dataset it streams from storage this way (``dataset.<format>.sealed``), so no
plaintext copy of a tenant's data sits in the job directory; the runner is given the job's key in its environment
(``KEY_ENV``, which the scheduler keeps sealed with the run, never on disk) and reads the dataset through
``SealedFileSource``. The format is the storage service's segment format (Tink's AES-GCM-HKDF streaming format,
``services.mesh.segments``): a file cut short, with a segment changed, moved or taken from another job's file
fails to open (ValueError naming the segment), and no byte of a segment that failed is handed on.

A job's key is derived from the training service's master key and the job id (HKDF), so every replica, and the
service after a restart, gives a resumed run the same key without storing one more secret.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.mesh.segments import AES_GCM_HKDF, HEADER_BYTES, TAG_BYTES, SegmentCorrupt, SegmentLayout
from services.training.runner.data import DatasetSource, LocalFileSource

__all__ = ["KEY_ENV", "SUFFIX", "SealedFileSource", "SealedFileWriter", "dataset_source", "job_data_key", "key_env"]

#: The runner's environment variable holding its job's key (base64).
KEY_ENV = "AIDC_JOB_DATA_KEY"
#: Suffix of a sealed file; the name before it (dataset.csv) is the dataset's.
SUFFIX = ".sealed"
_LAYOUT = SegmentLayout(1 << 20)
_AAD = b"aidc.training.job-dataset"


def job_data_key(master_key: bytes, job_id: str) -> bytes:
    """The job's own 32-byte key: HKDF-SHA256 of the service's master key, bound to the job id."""
    info = b"aidc.training.job-data-key:" + job_id.encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master_key)


def key_env(key: bytes) -> dict[str, str]:
    """The runner's environment entry carrying ``key``."""
    return {KEY_ENV: base64.b64encode(key).decode()}


class SealedFileWriter:
    """Writes plaintext given piece by piece as a sealed file at ``path`` (created; the caller renames it into place
    once ``finish`` returned). Holds at most one segment's plaintext."""

    def __init__(self, path: Path, key: bytes) -> None:
        self._cipher = AES_GCM_HKDF.new(key, _AAD)
        self._file: BinaryIO = path.open("xb")
        self._file.write(self._cipher.header)
        self._pending = bytearray()
        self._index = 0
        self.size = 0

    def _room(self) -> int:
        return _LAYOUT.first_plain if self._index == 0 else _LAYOUT.plain

    def write(self, data: bytes | memoryview) -> None:
        self._pending += data
        self.size += len(data)
        # A full segment is sealed only once more follows: the last one must be sealed as the last.
        while len(self._pending) > self._room():
            room = self._room()
            self._seal(memoryview(self._pending)[:room], last=False)
            del self._pending[:room]

    def _seal(self, plaintext: memoryview, last: bool) -> None:
        out = bytearray(len(plaintext) + TAG_BYTES)
        self._cipher.seal_into(self._index, plaintext, last, memoryview(out))
        self._file.write(out)
        self._index += 1

    def finish(self) -> None:
        """Seals the last segment and makes the file durable."""
        self._seal(memoryview(self._pending), last=True)
        self._pending.clear()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class SealedFileSource:
    """A sealed dataset file, opened one segment at a time as the parser reads (a DatasetSource)."""

    path: Path
    key: bytes = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(SUFFIX)

    def chunks(self) -> Iterator[bytes]:
        if not self.path.is_file():
            raise ValueError(f"dataset {self.path} does not exist")
        with self.path.open("rb") as f:
            stored = os.fstat(f.fileno()).st_size
            try:
                count = _LAYOUT.segments(stored)
                cipher = AES_GCM_HKDF.from_header(self.key, _AAD, f.read(HEADER_BYTES))
            except (ValueError, SegmentCorrupt) as exc:
                raise ValueError(f"the job's sealed dataset {self.name} is damaged: {exc}") from None
            for index in range(count):
                start, end = _LAYOUT.stored_span(index, index, stored)
                segment = f.read(end - start)
                plaintext = bytearray(len(segment) - TAG_BYTES)
                try:
                    # The file's own size says which segment is last: one cut short at a segment boundary ends
                    # with a segment sealed as not last, which fails here.
                    cipher.open_into(index, segment, index == count - 1, memoryview(plaintext))
                except SegmentCorrupt as exc:
                    raise ValueError(
                        f"the job's sealed dataset {self.name} does not open with the job's key: {exc}"
                    ) from None
                yield bytes(plaintext)


def dataset_source(path: Path, environ: Mapping[str, str]) -> DatasetSource:
    """The runner's dataset: a sealed file (its key from ``environ``), or a plain one (a run started by hand, or a job
    submitted before datasets were sealed)."""
    if not path.name.endswith(SUFFIX):
        return LocalFileSource(path)
    encoded = environ.get(KEY_ENV, "")
    if not encoded:
        raise ValueError(f"the dataset {path.name} is sealed and {KEY_ENV} (the job's key) is not set")
    return SealedFileSource(path, base64.b64decode(encoded, validate=True))
