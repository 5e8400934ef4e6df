"""The storage service with its content cipher replaced by a copy: no encryption, no authentication of the stored
bytes, the same layout (header, 16-byte "tags" of zeros) and everything else as it is (gRPC, hashing, text checks,
parts, the object store). bench_storage's "transport floor", which shows what encryption itself costs; nothing
else may ever run it.  python -m tests.bench.storage_floor
"""

from __future__ import annotations

from services.mesh.segments import HEADER_BYTES, TAG_BYTES, SegmentCipher, SegmentCorrupt
from services.mesh.server import MeshServer, run_service
from services.storage.config import StorageSettings
from services.storage.server import build_server

_HEADER = bytes([HEADER_BYTES]) + bytes(HEADER_BYTES - 1)
_NO_TAG = bytes(TAG_BYTES)


class _Copy:
    """A SegmentCipher that copies."""

    @property
    def header(self) -> bytes:
        return _HEADER

    def seal_into(self, index: int, plaintext: memoryview | bytes, last: bool, out: memoryview) -> None:
        n = len(plaintext)
        out[:n] = plaintext
        out[n:] = _NO_TAG

    def open_into(self, index: int, segment: memoryview | bytes, last: bool, out: memoryview) -> None:
        out[:] = memoryview(segment)[:-TAG_BYTES]


class PlaintextSuite:
    """A CipherSuite of copies (benchmark only)."""

    def new(self, key: bytes, aad: bytes) -> SegmentCipher:
        return _Copy()

    def from_header(self, key: bytes, aad: bytes, header: bytes) -> SegmentCipher:
        if header != _HEADER:
            raise SegmentCorrupt("not a header of the benchmark's plaintext layout")
        return _Copy()


async def _build(settings: StorageSettings) -> MeshServer:
    return await build_server(settings, cipher_suite=PlaintextSuite())


if __name__ == "__main__":
    run_service("storage", StorageSettings.from_env, _build, malloc_arenas=2)
