"""The supervisor's state file (<data_dir>/run/state.json) and pid file, read by `aidc status` and `down`."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.platform.components import ComponentSpec, ProbeSpec
from services.platform.process import ProcessId

__all__ = [
    "ComponentState",
    "PlatformState",
    "state_path",
    "pid_path",
    "read_state",
    "write_state",
    "write_pid_file",
    "remove_run_files",
]


@dataclass
class ComponentState:
    """One component as the supervisor last saw it."""

    name: str
    address: str
    endpoints: list[str]
    probe: ProbeSpec
    log_file: str
    pid: int | None = None
    start_ticks: int | None = None
    #: Session id of the current or last process: equal to its pid, kept after it exits to find stragglers.
    session: int | None = None
    restarts: int = 0
    #: starting | running | restarting | stopped | failed
    status: str = "starting"
    last_exit: int | None = None
    #: Where its Prometheus metrics are read ("" when it serves none).
    metrics_url: str = ""
    #: Restarts because it stopped answering health checks (hung), out of ``restarts``.
    hung_restarts: int = 0
    #: Why it was last restarted ("exit code 1", "hung: 3 health checks unanswered"), "" before any restart.
    last_restart: str = ""

    @classmethod
    def from_spec(cls, spec: ComponentSpec) -> ComponentState:
        return cls(
            name=spec.name,
            address=spec.address,
            endpoints=list(spec.endpoints),
            probe=spec.probe,
            log_file=str(spec.log_file),
            metrics_url=spec.metrics_url,
        )

    @property
    def process(self) -> ProcessId | None:
        if self.pid is None or self.start_ticks is None:
            return None
        return ProcessId(self.pid, self.start_ticks)


@dataclass
class PlatformState:
    """The whole platform: the supervisor's identity, its phase and its components."""

    supervisor_pid: int
    supervisor_start_ticks: int
    data_dir: str
    started_at: float
    #: starting | serving | stopping | failed
    status: str = "starting"
    ready_seconds: float | None = None
    error: str = ""
    #: The supervisor's own metrics (components up, restarts by reason); "" when it serves none.
    metrics_url: str = ""
    components: list[ComponentState] = field(default_factory=list)

    @property
    def supervisor(self) -> ProcessId:
        return ProcessId(self.supervisor_pid, self.supervisor_start_ticks)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> PlatformState:
        raw: dict[str, Any] = json.loads(text)
        components = [ComponentState(**{**c, "probe": ProbeSpec(**c["probe"])}) for c in raw.pop("components", [])]
        return cls(**raw, components=components)


def state_path(run_dir: Path) -> Path:
    return run_dir / "state.json"


def pid_path(run_dir: Path) -> Path:
    return run_dir / "supervisor.pid"


def read_state(run_dir: Path) -> PlatformState | None:
    """The last state written, or None when there is none (or it is unreadable)."""
    try:
        return PlatformState.from_json(state_path(run_dir).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_state(run_dir: Path, state: PlatformState) -> None:
    """Replaces the state file atomically, so readers never see half of it."""
    _write_atomic(state_path(run_dir), state.to_json())


def write_pid_file(run_dir: Path, pid: int) -> None:
    _write_atomic(pid_path(run_dir), f"{pid}\n")


def remove_run_files(run_dir: Path) -> None:
    """Removes the pid file, then the state file (a pid file never outlives its state)."""
    pid_path(run_dir).unlink(missing_ok=True)
    state_path(run_dir).unlink(missing_ok=True)
