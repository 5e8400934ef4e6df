"""Settings of the training service: where jobs live, what a job asks of the scheduler by default, how runners
report progress, and the key that seals jobs' delegations at rest."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.mesh.config import MeshSettings, check_master_key, load_settings, master_key, setting

__all__ = ["TrainingSettings"]


@dataclass(frozen=True)
class TrainingSettings(MeshSettings):
    """MeshSettings plus the job directories, the default resources of a job and the runner's reporting."""

    training_jobs_dir: str = setting("", "Directory holding one directory per job; empty: <data_dir>/training/jobs.")
    training_default_cpu_millicores: int = setting(
        1000, "CPU a fine-tune asks the scheduler for when its spec names none, in millicores."
    )
    training_default_memory_bytes: int = setting(
        2 * 2**30, "Memory a fine-tune asks the scheduler for when its spec names none, in bytes."
    )
    training_default_pool: str = setting(
        "",
        "Scheduler pool a fine-tune runs in when its spec names none; empty: the scheduler's default pool (this "
        "machine). A cluster names its Ray pool, where the compute is.",
    )
    training_progress_interval_seconds: float = setting(2.0, "Seconds between the progress events of a runner.")
    training_runner_threads: int = setting(
        0, "torch threads of each runner (OMP_NUM_THREADS); 0: one per whole CPU core the job was given."
    )
    training_master_key: str = setting(
        "",
        "Base64 of 32 bytes sealing each job's delegation (how it acts for its submitter) at rest; empty: "
        "<data_dir>/training/master.key (0600).",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrainingSettings:
        return load_settings(cls, env)

    def validate(self) -> None:
        super().validate()
        if self.training_default_cpu_millicores < 1 or self.training_default_memory_bytes < 1:
            raise ValueError("AIDC_TRAINING_DEFAULT_CPU_MILLICORES and _MEMORY_BYTES must be positive")
        if self.training_default_pool and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", self.training_default_pool):
            raise ValueError("AIDC_TRAINING_DEFAULT_POOL must be lowercase letters, digits and '-'")
        if self.training_progress_interval_seconds < 0:
            raise ValueError("AIDC_TRAINING_PROGRESS_INTERVAL_SECONDS must not be negative")
        if self.training_runner_threads < 0:
            raise ValueError("AIDC_TRAINING_RUNNER_THREADS must not be negative")
        check_master_key(self.training_master_key, "AIDC_TRAINING_MASTER_KEY")

    def master_key(self) -> bytes:
        """The configured master key, or the one in <data_dir>/training/master.key (created 0600 on first use)."""
        return master_key(self.training_master_key, self.training_dir / "master.key")

    @property
    def training_dir(self) -> Path:
        return self.data_dir / "training"

    @property
    def jobs_dir(self) -> Path:
        """Root of the job directories (each runner's --job-dir is <jobs_dir>/<job id>)."""
        return Path(self.training_jobs_dir) if self.training_jobs_dir else self.training_dir / "jobs"

    @property
    def base_models_dir(self) -> Path:
        """Where tenants' registered base models are unpacked (<base_models_dir>/<tenant>/<name>)."""
        return self.training_dir / "base-models"
