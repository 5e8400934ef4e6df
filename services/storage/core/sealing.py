"""The blocking half of an upload: what the header asks for, and the writer that checks and masks text datasets,
hashes and seals the plaintext into the pipe towards the object store."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from services.mesh.errors import DataLoss, InvalidArgument
from services.storage.core.crypto import DataKey
from services.storage.core.model import MaskingRecord, TextDatasetRecord
from services.storage.core.names import ObjectKind
from services.storage.core.pii import PiiKind, Pseudonymizer
from services.storage.core.pipe import BoundedPipe, PipeWriter
from services.storage.core.textdata import TextDatasetProcessor, TextSpec

__all__ = ["UploadSpec", "SealingWriter", "DEFAULT_CONTENT_TYPE"]

DEFAULT_CONTENT_TYPE = "application/octet-stream"


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
    """The blocking half of an upload (runs in worker threads): text checks and masking, hashing, sealing into
    the pipe. ``finish`` checks what the header promised and ends the Tink stream, which ends the pipe."""

    def __init__(
        self,
        spec: UploadSpec,
        data_key: DataKey,
        aad: bytes,
        pipe: BoundedPipe,
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
        self.destination = PipeWriter(pipe)
        self._sealed = data_key.encrypting_stream(self.destination, aad)

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self._max:
            raise InvalidArgument(f"object larger than the limit of {self._max} bytes")
        if self._sent_sha is not None:
            self._sent_sha.update(data)
        self._emit(self._text.feed(data) if self._text is not None else data)

    def _emit(self, data: bytes) -> None:
        if data:
            self.sha.update(data)
            self.size += len(data)
            self._sealed.write(data)

    def finish(self) -> None:
        spec = self._spec
        if self._text is not None:
            self._emit(self._text.finish())
        if spec.expected_size is not None and spec.expected_size != self.received:
            raise DataLoss(f"received {self.received} bytes, the header announced {spec.expected_size}")
        if spec.expected_sha256:
            sent = (self._sent_sha or self.sha).hexdigest()
            if sent != spec.expected_sha256:
                raise DataLoss(f"the content's SHA-256 is {sent}, the header announced {spec.expected_sha256}")
        self._sealed.close()  # writes the final segment and closes the pipe: the S3 upload completes

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
