"""What the servicer hands the domain: a job submission and pool/node changes, already out of protobuf, and their
validation (the rules that do not need the policy core's state)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from services.mesh.errors import InvalidArgument
from services.scheduler.core import MAX_PRIORITY, MIN_PRIORITY, Prices, Resources

__all__ = [
    "JobRequest",
    "NodeChange",
    "PoolChange",
    "check_env",
    "check_name",
    "check_prices",
    "check_resources",
    "PRIVILEGED_PRIORITY",
]

#: Priorities above this are allowed to platform admins and mesh services only.
PRIVILEGED_PRIORITY = 500
_POOL_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_NODE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
_GPU_TYPE = re.compile(r"^([a-z0-9][a-z0-9._-]{0,63}|\*)$")
_MAX_ARGV_BYTES = 128 * 1024
_MAX_ENV_BYTES = 128 * 1024
_MAX_LABELS = 64
_MAX_RETRIES = 100
_MAX_GRACE_SECONDS = 3600.0


@dataclass(frozen=True)
class JobRequest:
    tenant: str
    name: str
    pool: str
    per_worker: Resources
    workers: int
    priority: int
    preemptible: bool
    argv: tuple[str, ...]
    env: Mapping[str, str]
    secret_env: Mapping[str, str]
    working_dir: str
    #: 0: the pool's limit.
    max_run_seconds: float
    max_retries: int
    #: None: the service's default.
    grace_seconds: float | None
    trace_carrier: Mapping[str, str]
    labels: Mapping[str, str]
    idempotency_key: str
    #: "": the pool's executor.
    executor: str = ""
    #: Ray pools: run the command once as a Ray driver that places the workers itself.
    driver: bool = False

    def check(self) -> None:
        """InvalidArgument for what is malformed whatever the pools and quotas are."""
        if len(self.name) > 200:
            raise InvalidArgument("name must be at most 200 characters")
        if not self.argv or not self.argv[0]:
            raise InvalidArgument("executor.command must name a program")
        if sum(len(a.encode()) for a in self.argv) > _MAX_ARGV_BYTES:
            raise InvalidArgument(f"executor.command is longer than {_MAX_ARGV_BYTES} bytes")
        check_env("executor.env", self.env)
        check_env("executor.secret_env", self.secret_env)
        if set(self.env) & set(self.secret_env):
            raise InvalidArgument("a variable is in both executor.env and executor.secret_env")
        if self.workers < 1:
            raise InvalidArgument("executor.workers must be at least 1")
        if not MIN_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise InvalidArgument(f"priority must be between {MIN_PRIORITY} and {MAX_PRIORITY}")
        if not 0 <= self.max_retries <= _MAX_RETRIES:
            raise InvalidArgument(f"executor.max_retries must be between 0 and {_MAX_RETRIES}")
        if self.max_run_seconds < 0:
            raise InvalidArgument("executor.max_run_duration must not be negative")
        if self.grace_seconds is not None and not 0 <= self.grace_seconds <= _MAX_GRACE_SECONDS:
            raise InvalidArgument(f"executor.termination_grace_period must be 0 to {_MAX_GRACE_SECONDS:.0f} s")
        if len(self.idempotency_key) > 200:
            raise InvalidArgument("idempotency_key must be at most 200 characters")
        if len(self.labels) > _MAX_LABELS or any(len(k) > 128 or len(v) > 256 for k, v in self.labels.items()):
            raise InvalidArgument(f"at most {_MAX_LABELS} labels, keys up to 128 and values up to 256 characters")
        if self.working_dir and not self.working_dir.startswith("/"):
            raise InvalidArgument("executor.working_dir must be an absolute path")
        check_resources("resources", self.per_worker)
        if self.per_worker.is_zero():
            raise InvalidArgument("resources: a job must request some CPU, memory or GPUs")


@dataclass(frozen=True)
class PoolChange:
    """A pool to create, or the new values of an existing one (None: unchanged)."""

    name: str
    executor: str = "local"
    prices: Prices | None = None
    max_run_seconds: float | None = None


@dataclass(frozen=True)
class NodeChange:
    """A node to add, or the new values of an existing one (None: unchanged; ``clear_prices``: back to the pool's)."""

    name: str
    pool: str = ""
    capacity: Resources | None = None
    labels: Mapping[str, str] | None = None
    prices: Prices | None = None
    clear_prices: bool = False
    state: str | None = None


def check_name(kind: str, name: str) -> None:
    pattern = _POOL_NAME if kind == "pool" else _NODE_NAME
    if not pattern.match(name):
        raise InvalidArgument(
            f"{kind} name {name!r} must be lowercase letters, digits"
            + (" and '-'" if kind == "pool" else ", '.', '_' and '-'")
        )


def check_env(what: str, env: Mapping[str, str]) -> None:
    for key in env:
        if not _ENV_NAME.match(key):
            raise InvalidArgument(f"{what}: {key!r} is not a valid environment variable name")
    if sum(len(k) + len(v.encode()) for k, v in env.items()) > _MAX_ENV_BYTES:
        raise InvalidArgument(f"{what} is larger than {_MAX_ENV_BYTES} bytes")


def check_resources(what: str, r: Resources) -> None:
    if r.any_negative():
        raise InvalidArgument(f"{what}: quantities must not be negative")
    if r.gpu_type and not _GPU_TYPE.match(r.gpu_type):
        raise InvalidArgument(f"{what}: gpu_type {r.gpu_type!r} must be lowercase letters, digits, '.', '_', '-'")


def check_prices(what: str, prices: Prices) -> None:
    values = [prices.cpu_core_hour_micros, prices.memory_gib_hour_micros, *prices.gpu_hour_micros.values()]
    if any(v < 0 for v in values):
        raise InvalidArgument(f"{what}: prices must not be negative")
    for gpu_type in prices.gpu_hour_micros:
        if not _GPU_TYPE.match(gpu_type):
            raise InvalidArgument(f"{what}: {gpu_type!r} is not a GPU type")
