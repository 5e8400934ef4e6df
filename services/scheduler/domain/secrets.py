"""Sealing of jobs' secret_env at rest: AES-256-GCM under the scheduler's master key, bound to the job id, so the
database never holds a secret in plaintext and a sealed blob cannot be moved to another job."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["SecretSealer"]

_NONCE_BYTES = 12


class SecretSealer:
    def __init__(self, master_key: bytes) -> None:
        self._aead = AESGCM(master_key)

    def seal(self, job_id: str, secrets: Mapping[str, str]) -> bytes:
        if not secrets:
            return b""
        nonce = os.urandom(_NONCE_BYTES)
        plaintext = json.dumps(dict(secrets), sort_keys=True).encode()
        return nonce + self._aead.encrypt(nonce, plaintext, f"aidc.scheduler.secret_env:{job_id}".encode())

    def unseal(self, job_id: str, sealed: bytes) -> dict[str, str]:
        if not sealed:
            return {}
        aad = f"aidc.scheduler.secret_env:{job_id}".encode()
        plaintext = self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], aad)
        value = json.loads(plaintext)
        return {str(k): str(v) for k, v in value.items()}
