"""Quantities of compute (CPU millicores, memory bytes, GPUs by type) and their prices per resource-hour."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction

from services.scheduler.core.errors import InvalidConfig

__all__ = ["Resources", "Prices", "GIB", "RESOURCE_NAMES", "format_amount", "cost_micros_of_rate"]

GIB = 1024**3
#: The quota dimensions, in the order of Resources.as_tuple().
RESOURCE_NAMES = ("cpu", "memory", "gpu")
# A rate in "rate units" is micros per hour times this: integer arithmetic for millicores and bytes, no float.
_RATE_DENOMINATOR = 1000 * GIB
_SECONDS_PER_HOUR = 3600


@dataclass(frozen=True, slots=True)
class Resources:
    """A quantity of compute: a request (per worker), a node's capacity, an allocation or a quota.

    ``gpu_type`` is the GPU model: in a request "" means any type, on a node it is the node's model; sums and
    quota arithmetic ignore it (a quota counts GPUs, not models)."""

    cpu_millicores: int = 0
    memory_bytes: int = 0
    gpus: int = 0
    gpu_type: str = ""

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.cpu_millicores, self.memory_bytes, self.gpus)

    @classmethod
    def of(cls, values: tuple[int, int, int] | list[int], gpu_type: str = "") -> Resources:
        return cls(values[0], values[1], values[2], gpu_type)

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.cpu_millicores + other.cpu_millicores,
            self.memory_bytes + other.memory_bytes,
            self.gpus + other.gpus,
            self.gpu_type if self.gpu_type == other.gpu_type else "",
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            self.cpu_millicores - other.cpu_millicores,
            self.memory_bytes - other.memory_bytes,
            self.gpus - other.gpus,
            self.gpu_type if self.gpu_type == other.gpu_type else "",
        )

    def scaled(self, n: int) -> Resources:
        return Resources(self.cpu_millicores * n, self.memory_bytes * n, self.gpus * n, self.gpu_type)

    def fits_in(self, other: Resources) -> bool:
        """Every quantity is at most the other's (GPU models are not compared)."""
        return (
            self.cpu_millicores <= other.cpu_millicores
            and self.memory_bytes <= other.memory_bytes
            and self.gpus <= other.gpus
        )

    def is_zero(self) -> bool:
        return self.cpu_millicores == 0 and self.memory_bytes == 0 and self.gpus == 0

    def any_negative(self) -> bool:
        return self.cpu_millicores < 0 or self.memory_bytes < 0 or self.gpus < 0

    def describe(self) -> str:
        """Human-readable, e.g. "2 cpu, 8 GiB, 1 GPU of type a100"."""
        parts = [format_amount(0, self.cpu_millicores), format_amount(1, self.memory_bytes)]
        if self.gpus:
            parts.append(format_amount(2, self.gpus) + (f" of type {self.gpu_type}" if self.gpu_type else ""))
        return ", ".join(parts)


def format_amount(index: int, value: int) -> str:
    """One quantity for a message: index 0 cpu (cores), 1 memory (GiB), 2 GPUs."""
    if index == 0:
        return f"{_trim(value / 1000)} cpu"
    if index == 1:
        return f"{_trim(value / GIB)} GiB"
    return f"{value} GPU" + ("" if value == 1 else "s")


def _trim(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class Prices:
    """Prices per resource-hour in integer micros of the billing currency (money is never a float)."""

    cpu_core_hour_micros: int = 0
    memory_gib_hour_micros: int = 0
    gpu_hour_micros: Mapping[str, int] = field(default_factory=dict)  # by GPU model

    def check(self, what: str) -> None:
        """InvalidConfig naming ``what`` unless every price is a non-negative integer."""
        values = [self.cpu_core_hour_micros, self.memory_gib_hour_micros, *self.gpu_hour_micros.values()]
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
            raise InvalidConfig(f"{what}: prices must be non-negative integer micros per hour")

    def gpu_hour(self, gpu_type: str) -> int:
        price = self.gpu_hour_micros.get(gpu_type)
        if price is None:
            raise InvalidConfig(f"no GPU price for type {gpu_type!r}")
        return price

    def rate(self, r: Resources, gpu_type: str) -> int:
        """The hourly price of ``r`` on GPUs of ``gpu_type``, in exact rate units (micros/hour x 1000 x GiB)."""
        rate = r.cpu_millicores * self.cpu_core_hour_micros * GIB + r.memory_bytes * self.memory_gib_hour_micros * 1000
        if r.gpus:
            rate += r.gpus * self.gpu_hour(gpu_type) * _RATE_DENOMINATOR
        return rate

    def cost_micros(self, r: Resources, seconds: float, gpu_type: str | None = None) -> int:
        """What holding ``r`` for ``seconds`` costs, rounded up to whole micros; GPUs priced as ``gpu_type``
        (default: the request's own)."""
        return cost_micros_of_rate(self.rate(r, r.gpu_type if gpu_type is None else gpu_type), seconds)


def cost_micros_of_rate(rate: int, seconds: float) -> int:
    """A rate (Prices.rate, possibly summed over nodes) held for ``seconds``, rounded up once to whole micros."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"bad duration {seconds!r}")
    exact = Fraction(rate) * Fraction(seconds) / (_RATE_DENOMINATOR * _SECONDS_PER_HOUR)
    return math.ceil(exact)
