"""The segment cipher is Tink's AES-GCM-HKDF streaming format: what it seals Tink's own stream opens and the reverse,
its layout arithmetic matches Tink's ciphertexts byte for byte, and each segment opens only as itself."""

from __future__ import annotations

import io
import os

import pytest

from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.mesh.errors import DataLoss
from services.mesh.segments import (
    AES_GCM_HKDF,
    HEADER_BYTES,
    TAG_BYTES,
    SegmentCipher,
    SegmentCorrupt,
    SegmentLayout,
)
from services.storage.core.crypto import DataKey
from services.storage.wire import deserialize_download, encode_chunk

MiB = 1024 * 1024
AAD = b"tenant/datasets/name/object-id"
LAYOUT = SegmentLayout(MiB)
#: Plaintext sizes around every boundary of the layout.
SIZES = [
    0,
    1,
    LAYOUT.first_plain - 1,
    LAYOUT.first_plain,
    LAYOUT.first_plain + 1,
    LAYOUT.first_plain + LAYOUT.plain,
    LAYOUT.first_plain + LAYOUT.plain + 1,
    3 * MiB + 12345,
]


class _Keep(io.BytesIO):
    def close(self) -> None:  # Tink closes its destination
        pass


def _tink_seal(key: DataKey, plaintext: bytes, write: int = MiB) -> bytes:
    out = _Keep()
    with key.encrypting_stream(out, AAD) as stream:
        for start in range(0, len(plaintext), write):
            stream.write(plaintext[start : start + write])
    return out.getvalue()


def _seal(key: DataKey, plaintext: bytes) -> bytes:
    """Sealed as core.sealing lays it out: full segments, the last one flagged (and empty only if all is)."""
    stream_key = key.stream_key()
    cipher = AES_GCM_HKDF.new(stream_key.key, AAD)
    out = bytearray(cipher.header)
    start, index = 0, 0
    while True:
        size = LAYOUT.first_plain if index == 0 else LAYOUT.plain
        piece = plaintext[start : start + size]
        last = start + size >= len(plaintext)
        segment = bytearray(len(piece) + TAG_BYTES)
        cipher.seal_into(index, piece, last, memoryview(segment))
        out += segment
        if last:
            return bytes(out)
        start, index = start + size, index + 1


def _open_segment(cipher: SegmentCipher, index: int, segment: bytes, last: bool) -> bytes:
    out = bytearray(len(segment) - TAG_BYTES)
    cipher.open_into(index, segment, last, memoryview(out))
    return bytes(out)


def _open(key: DataKey, stored: bytes) -> bytes:
    stream_key = key.stream_key()
    cipher = AES_GCM_HKDF.from_header(stream_key.key, AAD, stored[:HEADER_BYTES])
    count = LAYOUT.segments(len(stored))
    out = bytearray()
    for index in range(count):
        start, end = LAYOUT.stored_span(index, index, len(stored))
        out += _open_segment(cipher, index, stored[start:end], index == count - 1)
    return bytes(out)


@pytest.mark.parametrize("size", SIZES)
def test_tink_opens_what_the_segment_cipher_seals_and_the_reverse(size: int) -> None:
    key = DataKey.generate()
    plaintext = os.urandom(size)
    ours = _seal(key, plaintext)
    assert key.decrypting_stream(io.BytesIO(ours), AAD).read() == plaintext
    for write in (MiB, 4096, 3 * MiB):
        theirs = _tink_seal(key, plaintext, write)
        assert len(theirs) == len(ours) == LAYOUT.stored_size(size)
        assert _open(key, theirs) == plaintext
    assert LAYOUT.plaintext_size(len(ours)) == size


@pytest.mark.parametrize("offset", [0, 1, LAYOUT.first_plain - 1, LAYOUT.first_plain, 2 * MiB, 3 * MiB])
def test_layout_maps_plaintext_offsets_to_segments(offset: int) -> None:
    index = LAYOUT.segment_at(offset)
    start = LAYOUT.plain_start(index)
    size = LAYOUT.first_plain if index == 0 else LAYOUT.plain
    assert start <= offset < start + size
    assert LAYOUT.plain_start(index + 1) == start + size


def test_a_segment_opens_only_as_itself() -> None:
    key = DataKey.generate()
    stored = _seal(key, os.urandom(3 * MiB))
    stream_key = key.stream_key()
    cipher = AES_GCM_HKDF.from_header(stream_key.key, AAD, stored[:HEADER_BYTES])
    first = stored[HEADER_BYTES:MiB]
    second = stored[MiB : 2 * MiB]
    final = stored[3 * MiB :]
    assert len(_open_segment(cipher, 1, second, last=False)) == LAYOUT.plain
    for index, segment, last in [
        (0, second, False),  # moved
        (1, second, True),  # claimed final: a stream cut after it would otherwise pass
        (3, final, False),  # the final one presented as if more followed
        (1, first, False),
    ]:
        with pytest.raises(SegmentCorrupt):
            _open_segment(cipher, index, segment, last)
    other = AES_GCM_HKDF.from_header(stream_key.key, b"another object", stored[:HEADER_BYTES])
    with pytest.raises(SegmentCorrupt):
        _open_segment(other, 1, second, last=False)


def test_layout_rejects_impossible_stored_sizes() -> None:
    for stored in (0, HEADER_BYTES, HEADER_BYTES + TAG_BYTES - 1, MiB + TAG_BYTES - 1):
        with pytest.raises(ValueError):
            LAYOUT.segments(stored)


def test_a_malformed_data_key_is_data_loss() -> None:
    with pytest.raises(DataLoss):
        DataKey.parse(b"not a keyset")


def test_download_chunks_decode_both_ways() -> None:
    """Chunks encoded by hand are valid DownloadResponses, and protobuf-encoded ones decode too; a chunk is taken
    out of its message without copying it."""
    for chunk in (b"", b"x", os.urandom(300), os.urandom(MiB)):
        encoded = encode_chunk(chunk)
        assert pb.DownloadResponse.FromString(encoded).chunk == chunk
        decoded = deserialize_download(encoded)
        assert decoded == chunk
        assert isinstance(decoded, memoryview) and decoded.obj is encoded  # a view of the message, not a copy
        assert deserialize_download(pb.DownloadResponse(chunk=chunk).SerializeToString()) == chunk
        with_unknown_field = encoded + b"\x78\x01"  # field 15, a varint: not ours to skip, protobuf parses it
        fallback = deserialize_download(with_unknown_field)
        assert isinstance(fallback, pb.DownloadResponse) and fallback.chunk == chunk
    info = pb.DownloadResponse(object=pb.ObjectInfo(name="x", size_bytes=3))
    message = deserialize_download(info.SerializeToString())
    assert isinstance(message, pb.DownloadResponse) and message.object.name == "x"
