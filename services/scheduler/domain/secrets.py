"""Sealing of jobs' secret_env at rest: AES-256-GCM under the scheduler's master key, bound to the job id, so the
database never holds a secret in plaintext and a sealed blob cannot be moved to another job."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from services.mesh.sealing import InvalidTag, WrongMasterKey, seal, unseal

__all__ = ["SecretSealer"]


class SecretSealer:
    def __init__(self, master_key: bytes) -> None:
        self._master = master_key

    def seal(self, job_id: str, secrets: Mapping[str, str]) -> bytes:
        if not secrets:
            return b""
        plaintext = json.dumps(dict(secrets), sort_keys=True).encode()
        return seal(self._master, plaintext, f"aidc.scheduler.secret_env:{job_id}".encode())

    def check(self, jobs: Iterable[tuple[str, bytes]]) -> None:
        """Refuses (WrongMasterKey) a master key that does not open the secrets of the (job id, sealed) given: the
        jobs still to run. Started with it, the scheduler would fail each of them at its launch as lost, saying
        nothing of the key. Terminal jobs' secrets are never opened again, so they are not asked."""
        for job_id, sealed in jobs:
            if not sealed:
                continue
            try:
                self.unseal(job_id, sealed)
            except InvalidTag:
                raise WrongMasterKey(
                    f"the secret_env of job {job_id} does not open with this master key: AIDC_SCHEDULER_MASTER_KEY "
                    "(or <data_dir>/scheduler/master.key) is not the key the scheduler database was sealed with"
                ) from None
            return  # one sealed blob tells: every secret is sealed under the same key

    def unseal(self, job_id: str, sealed: bytes) -> dict[str, str]:
        if not sealed:
            return {}
        plaintext = unseal(self._master, sealed, f"aidc.scheduler.secret_env:{job_id}".encode())
        value = json.loads(plaintext)
        return {str(k): str(v) for k, v in value.items()}
