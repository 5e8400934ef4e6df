"""Settings of the scheduler service: the default pool (this machine) and its prices, the cycle, the budget cache,
metering windows, the local executor and an optional Ray cluster's pool."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.mesh.config import MeshSettings, check_master_key, load_settings, setting

__all__ = ["SchedulerSettings"]

_GPU_PRICE = re.compile(r"^([a-z0-9][a-z0-9._-]*|\*)=(\d+)$")


@dataclass(frozen=True)
class SchedulerSettings(MeshSettings):
    """MeshSettings plus the default pool, the scheduling cycle, budget checks, metering and the local executor."""

    scheduler_default_pool: str = setting("default", "Pool of jobs submitted without one; this machine's pool.")
    scheduler_register_local_node: bool = setting(
        True, "Register this machine as a node of the default pool at start (cores, memory and GPUs detected)."
    )
    scheduler_local_node_name: str = setting("", "Name of this machine's node; empty: 'local'.")
    scheduler_local_cpu_millicores: int = setting(0, "CPU capacity this machine offers in millicores; 0: detected.")
    scheduler_local_memory_bytes: int = setting(0, "Memory this machine offers in bytes; 0: detected.")
    scheduler_cpu_core_hour_micros: int = setting(
        40_000,
        "Default pool's price per CPU core-hour, in micros of the currency (the seeded price book's cpu_core_seconds "
        "price, so billing's catch-all and its free core-hours apply unchanged).",
    )
    scheduler_memory_gib_hour_micros: int = setting(
        5_000, "Default pool's price per GiB-hour of memory, in micros (the seeded price book's memory_gib_seconds)."
    )
    scheduler_gpu_hour_micros: tuple[str, ...] = setting(
        ("nvidia-h100-80gb=4000000", "nvidia-a100-80gb=2500000", "nvidia-l4=800000", "*=2000000"),
        "Default pool's price per GPU-hour by type, type=micros (comma-separated; '*' any other type); the seeded "
        "price book's gpu_seconds prices.",
    )
    scheduler_currency: str = setting("USD", "Currency of pool prices; must be billing's AIDC_BILLING_CURRENCY.")
    scheduler_max_run_seconds: float = setting(
        86_400.0, "Default pool's longest run of a job (and of max_run_duration) in seconds."
    )
    scheduler_cycle_interval_seconds: float = setting(
        1.0, "Seconds between scheduling cycles when nothing triggers one (submissions and releases trigger one)."
    )
    scheduler_budget_cache_seconds: float = setting(
        5.0, "How long billing's CheckBudget answer for a tenant is trusted before it is asked again."
    )
    scheduler_metering_interval_seconds: float = setting(
        60.0,
        "Length of the metering windows (aligned to multiples of it since the epoch): each running job's allocation "
        "is billed window by window, and up to its release.",
    )
    scheduler_default_grace_seconds: float = setting(
        30.0, "Seconds between SIGTERM and SIGKILL of jobs that set no termination_grace_period."
    )
    scheduler_jobs_dir: str = setting("", "Directory holding one directory per job; empty: <data_dir>/scheduler/jobs.")
    scheduler_poll_seconds: float = setting(
        0.5, "How often the liveness of workers adopted after a restart (no longer our children) is checked."
    )
    scheduler_master_key: str = setting(
        "", "Base64 of 32 bytes sealing jobs' secret_env at rest; empty: <data_dir>/scheduler/master.key (0600)."
    )
    scheduler_ray_address: str = setting(
        "",
        "Address of a Ray cluster (host:port of its GCS, e.g. the KubeRay head service's 6379) backing the Ray pool; "
        "empty: no Ray pool and ray is never imported. The cluster's nodes and resources become the pool's.",
    )
    scheduler_ray_pool: str = setting("ray", "Name of the pool backed by the Ray cluster (created if missing).")
    scheduler_ray_sync_seconds: float = setting(
        2.0, "How often the Ray pool's nodes are read from the cluster (a node that left goes NOT_READY)."
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SchedulerSettings:
        return load_settings(cls, env)

    def validate(self) -> None:
        super().validate()
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", self.scheduler_default_pool):
            raise ValueError("AIDC_SCHEDULER_DEFAULT_POOL must be lowercase letters, digits and '-'")
        for name in ("cpu_millicores", "memory_bytes"):
            if getattr(self, f"scheduler_local_{name}") < 0:
                raise ValueError(f"AIDC_SCHEDULER_LOCAL_{name.upper()} must not be negative")
        if self.scheduler_cpu_core_hour_micros < 0 or self.scheduler_memory_gib_hour_micros < 0:
            raise ValueError("scheduler prices must not be negative")
        self.gpu_prices()
        if not re.fullmatch(r"[A-Z]{3}", self.scheduler_currency):
            raise ValueError("AIDC_SCHEDULER_CURRENCY must be an ISO 4217 code")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", self.scheduler_ray_pool):
            raise ValueError("AIDC_SCHEDULER_RAY_POOL must be lowercase letters, digits and '-'")
        if self.scheduler_ray_address and self.scheduler_ray_pool == self.scheduler_default_pool:
            raise ValueError("AIDC_SCHEDULER_RAY_POOL must differ from AIDC_SCHEDULER_DEFAULT_POOL (this machine's)")
        for name in (
            "max_run_seconds",
            "cycle_interval_seconds",
            "metering_interval_seconds",
            "poll_seconds",
            "ray_sync_seconds",
        ):
            if getattr(self, f"scheduler_{name}") <= 0:
                raise ValueError(f"AIDC_SCHEDULER_{name.upper()} must be positive")
        if self.scheduler_budget_cache_seconds < 0 or self.scheduler_default_grace_seconds < 0:
            raise ValueError("AIDC_SCHEDULER_BUDGET_CACHE_SECONDS and _DEFAULT_GRACE_SECONDS must not be negative")
        check_master_key(self.scheduler_master_key, "AIDC_SCHEDULER_MASTER_KEY")

    def gpu_prices(self) -> dict[str, int]:
        """The default pool's GPU-hour prices by type ('*': any other type)."""
        prices = {}
        for item in self.scheduler_gpu_hour_micros:
            found = _GPU_PRICE.match(item)
            if found is None:
                raise ValueError(f"AIDC_SCHEDULER_GPU_HOUR_MICROS: {item!r} is not type=micros")
            prices[found.group(1)] = int(found.group(2))
        return prices

    @property
    def scheduler_dir(self) -> Path:
        return self.data_dir / "scheduler"

    @property
    def jobs_dir(self) -> Path:
        return Path(self.scheduler_jobs_dir) if self.scheduler_jobs_dir else self.scheduler_dir / "jobs"
