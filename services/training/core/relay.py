"""The runner's stdout, one JSON event per line, as the job's history: reading what is new in an attempt's output
file, and turning each line into an event of the job (and the record changes it implies)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunnerLine", "read_new_lines", "translate"]

#: Bytes read from an output file at once; a line longer than this without a newline is cut (a runner prints
#: events of a few hundred bytes).
_READ_BYTES = 4 * 1024 * 1024
_MAX_LOG_CHARS = 2000


def read_new_lines(path: Path, offset: int, *, to_end: bool) -> tuple[list[str], int]:
    """The complete lines of ``path`` from byte ``offset`` on, and the offset after them. ``to_end``: the writer has
    exited, so a last line without a newline is complete too. A missing file has no lines yet."""
    try:
        with path.open("rb") as stream:
            stream.seek(offset)
            data = stream.read(_READ_BYTES)
    except FileNotFoundError:
        return [], offset
    end = len(data) if to_end else data.rfind(b"\n") + 1
    if end == 0 and len(data) == _READ_BYTES:
        end = len(data)  # one over-long line: cut, rather than wait forever for its end
    text = data[:end].decode("utf-8", "replace")
    return [line for line in text.split("\n") if line.strip()], offset + end


@dataclass
class RunnerLine:
    """What one output line means for the job: an event of its history, and what it changes in the record."""

    kind: str
    data: dict[str, Any]
    progress: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    #: The runner failed and said why (becomes the job's error).
    error: str | None = None
    #: The runner entered this phase ("exporting", "failed", ...).
    phase: str | None = None


def translate(line: str) -> RunnerLine:
    """One stdout line of the runner (see services.training.runner.events.JsonLinesSink)."""
    try:
        record = json.loads(line)
        kind = record.pop("event")
        record.pop("time", None)
    except (ValueError, KeyError, AttributeError, TypeError):
        return RunnerLine("log", {"level": "info", "message": line[:_MAX_LOG_CHARS]})
    if kind == "progress":
        return RunnerLine("progress", record, progress=record)
    if kind == "eval":
        return RunnerLine("metrics", record, metrics=record)
    if kind == "checkpoint":
        return RunnerLine("checkpoint", record)
    if kind == "state":
        state = str(record.get("state", ""))
        error = (str(record.get("message", "")) or "the runner failed") if state == "failed" else None
        return RunnerLine("log", {"level": "info", "message": f"runner: {state}"}, error=error, phase=state)
    level = record.get("level", "info") if kind == "log" else "info"
    message = record.get("message", "") if kind == "log" else line
    return RunnerLine("log", {"level": level, "message": str(message)[:_MAX_LOG_CHARS]})
