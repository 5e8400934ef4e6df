"""The known meters, and which usage-event attributes are dimensions (aggregated, priced) or references."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Meter", "METERS", "METER_NAMES", "REFERENCE_ATTRIBUTES", "KNOWN_ATTRIBUTES", "meter_order"]


@dataclass(frozen=True)
class Meter:
    """One metered quantity and its unit."""

    name: str
    unit: str
    description: str


METERS: dict[str, Meter] = {
    m.name: m
    for m in (
        Meter("gpu_seconds", "GPU-second", "GPU time, by attribute gpu_type"),
        Meter("cpu_core_seconds", "core-second", "CPU time of jobs and services"),
        Meter("memory_gib_seconds", "GiB-second", "memory held over time"),
        Meter("storage_gib_hours", "GiB-hour", "stored bytes over time"),
        Meter("inference_requests", "request", "inference requests served"),
        Meter("inference_compute_ms", "millisecond", "model compute time as Triton reports it"),
    )
}
METER_NAMES: tuple[str, ...] = tuple(METERS)

#: Attributes that name one event (a request, a trace): kept with the event, never aggregated on or priced by.
REFERENCE_ATTRIBUTES = frozenset({"request_id", "trace_id"})
#: Attributes the platform's emitters use; others are accepted as dimensions too.
KNOWN_ATTRIBUTES = frozenset(
    {"model", "model_version", "deployment", "job", "request_id", "trace_id", "gpu_type", "dataset", "pool"}
)

_ORDER = {name: i for i, name in enumerate(METER_NAMES)}


def meter_order(meter: str) -> int:
    """Sort key listing meters in their documented order."""
    return _ORDER.get(meter, len(_ORDER))
