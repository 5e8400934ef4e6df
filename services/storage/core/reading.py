"""The blocking half of a download: reads from the object store only the stored segments a byte range covers, opens
each (authenticated before any of its plaintext is returned) and cuts the range out of them.

Every segment authenticates under the object's own key as the segment at its index, final or not, and the segment
count comes from the stored size recorded with the version: a read that ends without an error released exactly
the plaintext sealed at upload, whose SHA-256 the upload recorded (core.sealing hashes exactly what it seals). A
whole-object read also checks that nothing follows the final segment; with ``check_sha256`` (the read-back of
AIDC_STORAGE_VERIFY_UPLOADS) it hashes the plaintext again and releases the final piece only if it matches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from services.mesh.errors import DataLoss
from services.mesh.segments import HEADER_BYTES, TAG_BYTES, CipherSuite, SegmentCorrupt
from services.storage.core.crypto import StreamKey
from services.storage.objectstore import ObjectStore, ReadableObject, StoredObjectMissing

__all__ = ["ByteRange", "StoredContent", "read_plaintext"]


@dataclass(frozen=True)
class StoredContent:
    """Where an object's ciphertext is and what it must open to (recorded at upload)."""

    s3_key: str
    stored_bytes: int
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ByteRange:
    """Plaintext bytes [start, end) of an object."""

    start: int
    end: int


def _short() -> DataLoss:
    return DataLoss("the stored object is shorter than its recorded size")


def _corrupt() -> DataLoss:
    return DataLoss("the stored object is corrupt or was tampered with (authentication failed)")


def _open(objects: ObjectStore, key: str, offset: int = 0, length: int = 0) -> ReadableObject:
    try:
        return objects.open(key, offset, length)
    except StoredObjectMissing:
        raise DataLoss("the object's stored bytes are missing from the object store or shorter than recorded") from None


def _exactly(source: ReadableObject, size: int) -> bytes:
    data = source.read_exact(size)
    if len(data) != size:
        raise _short()
    return data


def read_plaintext(
    objects: ObjectStore,
    record: StoredContent,
    key: StreamKey,
    suite: CipherSuite,
    aad: bytes,
    wanted: ByteRange,
    check_sha256: bool = False,
    piece_segments: int = 1,
) -> Iterator[memoryview]:
    """The plaintext of ``wanted`` (within the object), in pieces of at most ``piece_segments`` segments; raises
    DataLoss for anything stored that is missing, short, long, or does not authenticate, and the store's
    Unavailable. Each piece is a view of one buffer that the next piece overwrites: take what it holds before
    asking for the next. The ciphertext, too, is read into one buffer, straight from the socket: no allocation and
    no copy per segment."""
    layout = key.layout
    stored = record.stored_bytes
    try:
        count = layout.segments(stored)
        consistent = layout.plaintext_size(stored) == record.size_bytes
    except ValueError:
        consistent = False
    if not consistent:
        raise DataLoss("the version's recorded sizes do not fit its encrypted layout")
    whole = wanted.start == 0 and wanted.end == record.size_bytes
    first = layout.segment_at(wanted.start)
    last = count - 1 if whole else layout.segment_at(wanted.end - 1)
    start, end = layout.stored_span(first, last, stored)
    if first == 0:
        # The header and the segments in one request (for a whole object: to its very end, to see what follows).
        source = _open(objects, record.s3_key, 0, 0 if whole else end)
    else:
        head = _open(objects, record.s3_key, 0, HEADER_BYTES)
        try:
            header = _exactly(head, HEADER_BYTES)
        finally:
            head.close()
        source = _open(objects, record.s3_key, start, end - start)
    digest = hashlib.sha256() if whole and check_sha256 else None
    group = max(1, min(piece_segments, last - first + 1))
    covered = end - start - TAG_BYTES * (last - first + 1)  # plaintext of the segments read (a small object's few)
    plain = memoryview(bytearray(min(group * layout.plain, covered)))
    sealed_buffer = memoryview(bytearray(min(group * layout.segment_bytes, end - start)))
    try:
        if first == 0:
            header = _exactly(source, HEADER_BYTES)
        try:
            cipher = suite.from_header(key.key, aad, header)
        except SegmentCorrupt:
            raise _corrupt() from None
        for group_first in range(first, last + 1, group):
            group_last = min(group_first + group - 1, last)
            span_start, span_end = layout.stored_span(group_first, group_last, stored)
            sealed = sealed_buffer[: span_end - span_start]
            if source.readinto_exact(sealed) != len(sealed):
                raise _short()
            at = filled = 0
            for index in range(group_first, group_last + 1):
                segment_start, segment_end = layout.stored_span(index, index, stored)
                size = segment_end - segment_start - TAG_BYTES
                try:
                    cipher.open_into(
                        index, sealed[at : at + size + TAG_BYTES], index == count - 1, plain[filled : filled + size]
                    )
                except SegmentCorrupt:
                    raise _corrupt() from None
                at += size + TAG_BYTES
                filled += size
            opened = plain[:filled]
            if digest is not None:
                digest.update(opened)
            if whole and group_last == last:
                if source.read_exact(1):
                    raise DataLoss("the stored object is longer than its recorded size")
                if digest is not None and digest.hexdigest() != record.sha256:
                    raise DataLoss("the stored object does not match its recorded SHA-256")
            offset = layout.plain_start(group_first)
            cut = opened[max(wanted.start - offset, 0) : wanted.end - offset]
            if cut:
                yield cut
    finally:
        source.close()
