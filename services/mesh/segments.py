"""Stored objects' ciphertext, one segment at a time: Tink's AES-GCM-HKDF streaming format, sealed and opened with
pyca/cryptography so that any segment opens on its own (ranged reads decrypt only the segments they cover) and
sealing costs no Python stream adapters.

The format is Tink's own, unchanged (developers.google.com/tink/streaming-aead/aes_gcm_hkdf_streaming): objects
written by Tink's Python stream before this module and objects written by it read alike, and Tink opens both::

    header     = 40 (1 byte) || salt (32 random bytes) || nonce prefix (7 random bytes)
    object key = HKDF-SHA256(the data key, salt, info = the object's associated data), 32 bytes
    segment i  = AES-256-GCM(object key, nonce prefix || BE32(i) || last, plaintext of segment i)

``last`` is one byte, 1 for the final segment and 0 for every other. Stored, segment ``i`` spans bytes
``[i * S, (i + 1) * S)`` of the object (S, the ciphertext segment size, 1 MiB), segment 0 after the header; the
final segment may be shorter, and is empty only for an empty object.

Why a segment opened alone is as safe as the whole stream (the construction is STREAM, Hoang, Reyhanitabar,
Rogaway and Vizár 2015, whose random access Tink's C++ and Java expose as seekable channels; only its Python
wrapper does not):

* its tag authenticates it under a key that exists for this object only (a fresh data key and salt per upload)
  and is bound to the object's identity, so no segment of another object, tenant or version opens;
* its index is in the nonce, so segments cannot be reordered, repeated or moved within the object;
* the final segment says so, and every other says not: the reader takes the segment count from the stored size
  recorded with the version (in the database, beside the wrapped data key, never from the object store), opens
  the one it must find last with ``last = 1`` and all others with ``last = 0``; a stored object cut short, at a
  segment boundary or not, fails to authenticate or runs out of bytes.

Each (key, nonce) pair seals once: the key is derived per object with a random salt, and a writer seals each
index once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "HEADER_BYTES",
    "TAG_BYTES",
    "SegmentLayout",
    "SegmentCipher",
    "CipherSuite",
    "AesGcmHkdfSuite",
    "SegmentCorrupt",
    "AES_GCM_HKDF",
]

_KEY_BYTES = 32
_NONCE_PREFIX_BYTES = 7
HEADER_BYTES = 1 + _KEY_BYTES + _NONCE_PREFIX_BYTES
TAG_BYTES = 16
_LAST = b"\x01"
_NOT_LAST = b"\x00"


class SegmentCorrupt(Exception):
    """A segment or the header failed authentication or is malformed."""


@dataclass(frozen=True)
class SegmentLayout:
    """Where each segment of an object lies, in the stored bytes and in the plaintext."""

    segment_bytes: int  # stored size of a full segment (ciphertext and tag)

    def __post_init__(self) -> None:
        if self.segment_bytes <= HEADER_BYTES + TAG_BYTES:
            raise ValueError("segments must be larger than the header and a tag")

    @property
    def first_plain(self) -> int:
        """Plaintext bytes in a full segment 0 (it shares its stored span with the header)."""
        return self.segment_bytes - HEADER_BYTES - TAG_BYTES

    @property
    def plain(self) -> int:
        """Plaintext bytes in every other full segment."""
        return self.segment_bytes - TAG_BYTES

    def segments(self, stored: int) -> int:
        """How many segments an object of ``stored`` bytes holds (ValueError if no object is that long)."""
        if stored < HEADER_BYTES + TAG_BYTES:
            raise ValueError(f"{stored} stored bytes cannot hold the header and a segment")
        count = 1 if stored <= self.segment_bytes else 1 + -(-(stored - self.segment_bytes) // self.segment_bytes)
        if count > 1 and stored - (count - 1) * self.segment_bytes < TAG_BYTES:
            raise ValueError(f"{stored} stored bytes end inside a segment's tag")
        return count

    def plaintext_size(self, stored: int) -> int:
        return stored - HEADER_BYTES - TAG_BYTES * self.segments(stored)

    def stored_size(self, plaintext: int) -> int:
        """The stored size of ``plaintext`` bytes as a writer that fills every segment but the last lays them out."""
        if plaintext <= self.first_plain:
            return HEADER_BYTES + plaintext + TAG_BYTES
        rest = plaintext - self.first_plain
        return self.segment_bytes + rest + TAG_BYTES * -(-rest // self.plain)

    def segment_at(self, plain_offset: int) -> int:
        """The segment holding plaintext byte ``plain_offset``."""
        if plain_offset < self.first_plain:
            return 0
        return 1 + (plain_offset - self.first_plain) // self.plain

    def plain_start(self, index: int) -> int:
        """Plaintext offset of segment ``index``'s first byte."""
        return 0 if index == 0 else self.first_plain + (index - 1) * self.plain

    def stored_span(self, first: int, last: int, stored: int) -> tuple[int, int]:
        """Stored bytes [start, end) of segments ``first`` to ``last`` (inclusive) of an object of ``stored`` bytes."""
        start = HEADER_BYTES if first == 0 else first * self.segment_bytes
        return start, min((last + 1) * self.segment_bytes, stored)


class SegmentCipher(Protocol):
    """Seals and opens the segments of one object."""

    @property
    def header(self) -> bytes:
        """The object's header (stored before segment 0)."""
        ...

    def seal_into(self, index: int, plaintext: memoryview | bytes, last: bool, out: memoryview) -> None:
        """Writes segment ``index`` (ciphertext and tag, ``len(plaintext) + TAG_BYTES`` bytes) into ``out``."""
        ...

    def open_into(self, index: int, segment: memoryview | bytes, last: bool, out: memoryview) -> None:
        """Writes the plaintext of segment ``index`` (``len(segment) - TAG_BYTES`` bytes) into ``out``;
        SegmentCorrupt unless it authenticates as that segment (``out`` then holds no plaintext of it)."""
        ...


class CipherSuite(Protocol):
    """Makes the cipher of an object: a new one for an upload, or the one its stored header names."""

    def new(self, key: bytes, aad: bytes) -> SegmentCipher: ...

    def from_header(self, key: bytes, aad: bytes, header: bytes) -> SegmentCipher: ...


class _AesGcmHkdf:
    """One object's cipher: AES-256-GCM under the key HKDF derives from the data key, salt and associated data."""

    def __init__(self, key: bytes, aad: bytes, salt: bytes, nonce_prefix: bytes) -> None:
        if len(key) != _KEY_BYTES:
            raise ValueError("the data key must be 32 bytes")
        derived = HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=salt, info=aad).derive(key)
        self._aead = AESGCM(derived)
        self._prefix = nonce_prefix
        self._header = bytes([HEADER_BYTES]) + salt + nonce_prefix

    @property
    def header(self) -> bytes:
        return self._header

    def _nonce(self, index: int, last: bool) -> bytes:
        return self._prefix + index.to_bytes(4, "big") + (_LAST if last else _NOT_LAST)

    def seal_into(self, index: int, plaintext: memoryview | bytes, last: bool, out: memoryview) -> None:
        self._aead.encrypt_into(self._nonce(index, last), plaintext, None, out)

    def open_into(self, index: int, segment: memoryview | bytes, last: bool, out: memoryview) -> None:
        try:
            # On a failed tag pyca/cryptography zeroes ``out``: no unauthenticated plaintext stays in it.
            self._aead.decrypt_into(self._nonce(index, last), segment, None, out)
        except InvalidTag:
            raise SegmentCorrupt(f"segment {index} failed authentication") from None


class AesGcmHkdfSuite:
    """Tink's AES256_GCM_HKDF streaming format (see the module docstring)."""

    def new(self, key: bytes, aad: bytes) -> SegmentCipher:
        return _AesGcmHkdf(key, aad, os.urandom(_KEY_BYTES), os.urandom(_NONCE_PREFIX_BYTES))

    def from_header(self, key: bytes, aad: bytes, header: bytes) -> SegmentCipher:
        if len(header) != HEADER_BYTES or header[0] != HEADER_BYTES:
            raise SegmentCorrupt("the stored object's header is malformed")
        return _AesGcmHkdf(key, aad, header[1 : 1 + _KEY_BYTES], header[1 + _KEY_BYTES :])


AES_GCM_HKDF = AesGcmHkdfSuite()
