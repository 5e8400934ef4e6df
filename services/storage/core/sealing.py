"""The blocking half of an upload: what the header asks for, and the writer that checks and masks text datasets,
hashes the plaintext, seals it segment by segment into whole parts and hands them to the parallel part uploader."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from services.mesh.errors import DataLoss, InvalidArgument
from services.mesh.segments import TAG_BYTES, SegmentCipher, SegmentLayout
from services.storage.core.model import MaskingRecord, TextDatasetRecord
from services.storage.core.names import ObjectKind
from services.storage.core.parts import PartUploader
from services.storage.core.pii import PiiKind, Pseudonymizer
from services.storage.core.textdata import TextDatasetProcessor, TextSpec

__all__ = ["UploadSpec", "SealingWriter", "DEFAULT_CONTENT_TYPE", "part_bytes"]

DEFAULT_CONTENT_TYPE = "application/octet-stream"


def part_bytes(requested: int, layout: SegmentLayout) -> int:
    """The stored size of an upload's parts: ``requested`` rounded up to whole segments, so that every part but
    the last holds whole segments only."""
    return -(-requested // layout.segment_bytes) * layout.segment_bytes


@dataclass(frozen=True)
class UploadSpec:
    """An Upload's header, in domain terms."""

    tenant: str
    kind: ObjectKind
    name: str
    content_type: str = DEFAULT_CONTENT_TYPE
    text: TextSpec | None = None
    expected_sha256: str = ""
    expected_size: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)


class SealingWriter:
    """The blocking half of an upload (runs in worker threads, one call at a time): text checks and masking,
    hashing, sealing into parts. ``finish`` checks what the header promised, seals the final segment and completes
    the object in the store.

    A full segment is sealed only once more plaintext arrives, so that the final segment, whichever it is, is
    sealed as the final one (Tink's rule: only an empty object has an empty final segment).
    """

    def __init__(
        self,
        spec: UploadSpec,
        cipher: SegmentCipher,
        layout: SegmentLayout,
        parts: PartUploader,
        part_size: int,
        max_bytes: int,
        pseudonymizer: Pseudonymizer | None,
    ) -> None:
        self._spec = spec
        self._pseudonymizer = pseudonymizer
        self._text = TextDatasetProcessor(spec.text, pseudonymizer) if spec.text is not None else None
        self._sent_sha = hashlib.sha256() if spec.expected_sha256 and self._text is not None else None
        self.sha = hashlib.sha256()
        self.received = 0
        self.size = 0
        self._max = max_bytes
        self._cipher = cipher
        self._layout = layout
        self._parts = parts
        self._part_size = part_bytes(part_size, layout)
        self._index = 0  # of the next segment to seal
        self._pending = bytearray()  # plaintext of the next segment
        self._part = bytearray(self._part_size)
        self._part[: len(cipher.header)] = cipher.header
        self._fill = len(cipher.header)

    def write(self, chunks: Iterable[bytes]) -> None:
        for data in chunks:
            self.received += len(data)
            if self.received > self._max:
                raise InvalidArgument(f"object larger than the limit of {self._max} bytes")
            if self._sent_sha is not None:
                self._sent_sha.update(data)
            self._emit(self._text.feed(data) if self._text is not None else data)

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        view = memoryview(data)
        pending = self._pending
        while view:
            room = self._layout.first_plain if self._index == 0 else self._layout.plain
            if len(pending) == room:  # more plaintext follows: the waiting segment is not the final one
                self._seal(pending, last=False)
                pending.clear()
            elif not pending and len(view) > room:  # a whole segment with more after it, sealed in place
                self._seal(view[:room], last=False)
                view = view[room:]
            else:
                take = min(room - len(pending), len(view))
                pending += view[:take]
                view = view[take:]

    def _seal(self, plaintext: bytes | bytearray | memoryview, last: bool) -> None:
        # The recorded SHA-256 and size are of exactly what is sealed, in order: what an authenticated read of the
        # stored object returns, so downloads need not hash again (see core.reading).
        self.sha.update(plaintext)
        self.size += len(plaintext)
        size = len(plaintext) + TAG_BYTES
        if self._fill + size > self._part_size:
            self._parts.submit(self._part)  # never touched again: the next part gets a new buffer
            self._part = bytearray(self._part_size)
            self._fill = 0
        out = memoryview(self._part)[self._fill : self._fill + size]
        self._cipher.seal_into(self._index, memoryview(plaintext), last, out)
        self._fill += size
        self._index += 1

    def finish(self) -> int:
        """Ends the upload: the number of bytes stored."""
        spec = self._spec
        if self._text is not None:
            self._emit(self._text.finish())
        if spec.expected_size is not None and spec.expected_size != self.received:
            raise DataLoss(f"received {self.received} bytes, the header announced {spec.expected_size}")
        self._seal(self._pending, last=True)  # into the last part, which is not sent before the checks below
        self._pending = bytearray()
        if spec.expected_sha256:
            sent = (self._sent_sha or self.sha).hexdigest()
            if sent != spec.expected_sha256:
                raise DataLoss(f"the content's SHA-256 is {sent}, the header announced {spec.expected_sha256}")
        return self._parts.finish(memoryview(self._part)[: self._fill])

    def text_summary(self) -> tuple[TextDatasetRecord | None, MaskingRecord | None]:
        text = self._text
        spec = self._spec.text
        if text is None or spec is None:
            return None, None
        summary = text.summary
        record = TextDatasetRecord(
            format=spec.format.value,
            text_column=spec.text_column,
            label_column=spec.label_column,
            row_count=summary.row_count,
            labels=dict(sorted(summary.labels.items())),
        )
        masking = None
        if spec.mask is not None:
            masking = MaskingRecord(
                masked_total=sum(summary.masked.values()),
                rows_affected=summary.rows_masked,
                counts={kind.name: summary.masked.get(kind, 0) for kind in PiiKind if kind in spec.mask.kinds},
                mode=spec.mask.mode.value,
                phone_regions=list(spec.mask.phone_regions),
                pseudonym_key_id=self._pseudonymizer.key_id if self._pseudonymizer is not None else "",
            )
        return record, masking
