"""Sealing of jobs' secret_env at rest: AES-256-GCM under the scheduler's master key, bound to the job id, so the
database never holds a secret in plaintext and a sealed blob cannot be moved to another job."""

from __future__ import annotations

import json
from collections.abc import Mapping

from services.mesh.sealing import seal, unseal

__all__ = ["SecretSealer"]


class SecretSealer:
    def __init__(self, master_key: bytes) -> None:
        self._master = master_key

    def seal(self, job_id: str, secrets: Mapping[str, str]) -> bytes:
        if not secrets:
            return b""
        plaintext = json.dumps(dict(secrets), sort_keys=True).encode()
        return seal(self._master, plaintext, f"aidc.scheduler.secret_env:{job_id}".encode())

    def unseal(self, job_id: str, sealed: bytes) -> dict[str, str]:
        if not sealed:
            return {}
        plaintext = unseal(self._master, sealed, f"aidc.scheduler.secret_env:{job_id}".encode())
        value = json.loads(plaintext)
        return {str(k): str(v) for k, v in value.items()}
