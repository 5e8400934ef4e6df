"""What the runner reports while it works (progress, evaluations, checkpoints, state changes, log lines), the
ProgressSink Protocol that receives it, a JSON-lines sink for the runner process's stdout, and cancellation."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TextIO

__all__ = [
    "CancelToken",
    "Cancelled",
    "CheckpointSaved",
    "CollectingSink",
    "EvalReport",
    "JsonLinesSink",
    "LogLine",
    "Progress",
    "ProgressSink",
    "RunnerEvent",
    "StateChanged",
]


@dataclass(frozen=True)
class StateChanged:
    """The job entered a phase: preparing, training, exporting, checking_parity, succeeded, failed, cancelled."""

    state: str
    detail: dict[str, Any] = field(default_factory=dict)
    event: str = "state"


@dataclass(frozen=True)
class Progress:
    """Training progress; step counts optimizer steps since the job began (it continues across resumes). loss is
    the mean over the steps since the last event (None when they saw no example: empty DP-SGD batches)."""

    step: int
    total_steps: int
    epoch: int
    examples_per_second: float
    loss: float | None
    learning_rate: float
    event: str = "progress"


@dataclass(frozen=True)
class EvalReport:
    """Held-out metrics after an epoch (or at the end of a run stopped by max_steps)."""

    epoch: int
    step: int
    metrics: dict[str, Any]
    event: str = "eval"


@dataclass(frozen=True)
class CheckpointSaved:
    name: str
    step: int
    epoch: int
    size_bytes: int
    event: str = "checkpoint"


@dataclass(frozen=True)
class LogLine:
    level: str
    message: str
    event: str = "log"


RunnerEvent = StateChanged | Progress | EvalReport | CheckpointSaved | LogLine


class ProgressSink(Protocol):
    """Receives the runner's events in order (the service relays them to WatchJob)."""

    def emit(self, event: RunnerEvent) -> None: ...


class JsonLinesSink:
    """One JSON object per line: {"event": kind, "time": unix seconds, ...the event's fields}."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: RunnerEvent) -> None:
        record = {"event": event.event, "time": round(time.time(), 3)}
        record.update({k: v for k, v in asdict(event).items() if k != "event"})
        line = json.dumps(record, separators=(",", ":"), default=str)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class CollectingSink:
    """Keeps every event in a list (tests, and callers that want the history)."""

    def __init__(self) -> None:
        self.events: list[RunnerEvent] = []

    def emit(self, event: RunnerEvent) -> None:
        self.events.append(event)


class Cancelled(Exception):
    """The run stopped because its CancelToken was set; the checkpoint written first is named."""

    def __init__(self, checkpoint: str | None) -> None:
        super().__init__(f"cancelled (checkpoint {checkpoint})")
        self.checkpoint = checkpoint


class CancelToken:
    """A flag the training loop checks between steps (set from a signal handler or another thread)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()
