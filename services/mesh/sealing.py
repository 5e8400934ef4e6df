"""Sealing small secrets at rest under a service's master key: AES-256-GCM, a fresh 96-bit nonce per seal, and
associated data binding each sealed blob to what it belongs to (a key id, a job id)."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["seal", "unseal", "InvalidTag", "WrongMasterKey"]

_NONCE_BYTES = 12
_TAG_BYTES = 16


class WrongMasterKey(RuntimeError):
    """What a service sealed does not open with the master key it was given: it must not start (it would refuse or
    lose what the key protects, e.g. sign with new keys and strand every issued token)."""


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """nonce || AES-256-GCM(plaintext) under ``key``, authenticated together with ``aad``."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext of ``seal(key, plaintext, aad)``; InvalidTag when the key, the blob or ``aad`` differ."""
    if len(sealed) < _NONCE_BYTES + _TAG_BYTES:
        raise InvalidTag()
    return AESGCM(key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], aad)
