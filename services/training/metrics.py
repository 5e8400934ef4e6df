"""The training service's own figures: jobs by state, read from the jobs table when scraped (so they are right
however a job got there: a runner, the scheduler, a restart), and optimizer steps done (their rate is steps/s),
counted where the runner's progress is relayed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from prometheus_client import Counter

from services.mesh.metrics import Figure, ScrapedFigures, child
from services.training.core.model import TERMINAL_STATES, JobState

__all__ = ["TrainingMetrics", "JobCounts"]

STEPS = Counter("aidc_training_steps", "Optimizer steps done by fine-tune jobs (their rate is steps/s).")
JOBS = ScrapedFigures(
    ("gauge", "aidc_training_jobs", "Fine-tune jobs in a state that is not final (queued, running, ...).", ("state",)),
    ("counter", "aidc_training_jobs_finished", "Fine-tune jobs that ended, by final state.", ("state",)),
)


class JobCounts(Protocol):
    def job_counts(self) -> Mapping[str, int]: ...


class TrainingMetrics:
    """Pre-bound children (no-ops with metrics off) and the jobs-by-state reader, handed to the core."""

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self._steps: Any = child(enabled, STEPS)
        self._detach = lambda: None

    def watch(self, store: JobCounts) -> None:
        """Reports ``store``'s jobs by state at every scrape (every state, 0 included), until ``close``."""
        if not self._enabled:
            return

        def read() -> list[Figure]:
            counts = store.job_counts()
            return [
                (
                    "aidc_training_jobs_finished" if state in TERMINAL_STATES else "aidc_training_jobs",
                    (state.value,),
                    float(counts.get(state.value, 0)),
                )
                for state in JobState
            ]

        self._detach = JOBS.attach(read)

    def progress(self, before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> None:
        """A job's progress moved from ``before`` to ``after`` (its step counter continues across resumes)."""
        done = int(after.get("step", 0) or 0) - int((before or {}).get("step", 0) or 0)
        if done > 0:
            self._steps.inc(done)

    def close(self) -> None:
        self._detach()
