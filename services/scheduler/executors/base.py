"""The scheduler's executor interface: what runs an admitted job's workers (local processes today, a Ray cluster
later), and the records that let a restarted scheduler find them again."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

__all__ = [
    "Executor",
    "ExitStatus",
    "LaunchRequest",
    "Run",
    "WorkerRef",
    "EXIT_LOST",
    "attempt_dir",
    "files_dir",
    "worker_output",
]

#: Exit code recorded for a worker that vanished without leaving its exit status (killed with its launcher, or
#: its machine restarted): the job is treated as failed by the platform, not by itself, and retried.
EXIT_LOST = -1


@dataclass(frozen=True)
class LaunchRequest:
    """One attempt of a job: ``workers`` copies of ``argv`` (one per entry of ``nodes``), all or none."""

    job_id: str
    attempt: int
    argv: tuple[str, ...]
    #: The full environment of every worker (secrets included: it lives in memory only, never in the database).
    env: Mapping[str, str]
    #: Where the scheduler keeps the job's files (output, exit status) unless ``cwd`` is set.
    job_dir: Path
    #: Node of each worker (len = the number of workers).
    nodes: tuple[str, ...]
    #: The job's working directory (ExecutorSpec.working_dir). Its submitter owns it, so the attempts' files go under
    #: it too: that is where the submitter reads the job's output (the training service relays a runner's events).
    cwd: Path | None = None

    @property
    def files_dir(self) -> Path:
        """The directory holding the attempts' files (see ``files_dir``)."""
        return files_dir(self.job_dir, self.cwd, self.job_id)


def files_dir(job_dir: Path, working_dir: Path | None, job_id: str) -> Path:
    """Where a job's attempts keep their files: ``<working_dir>/<job id>`` when the job names a working directory
    (the job id keeps two jobs sharing one apart), else the scheduler's own ``job_dir``."""
    return working_dir / job_id if working_dir is not None else job_dir


def attempt_dir(files: Path, attempt: int) -> Path:
    """Where one attempt's files are: worker-<i>.stdout/.stderr (output), .pid (launcher), .exit (exit status)."""
    return files / f"attempt-{attempt}"


def worker_output(working_dir: Path, job_id: str, attempt: int, worker: int = 0) -> Path:
    """The stdout file of one worker of an attempt of a job that runs in ``working_dir`` (what its submitter
    follows)."""
    return attempt_dir(files_dir(working_dir, working_dir, job_id), attempt) / f"worker-{worker}.stdout"


@dataclass(frozen=True)
class WorkerRef:
    """Enough to find one launched worker again after a scheduler restart: the executor's handle (a pid here, a Ray
    job id later) and what identifies that handle's incarnation (the process start time, against pid reuse)."""

    index: int
    node: str
    handle: str
    incarnation: str = ""


@dataclass(frozen=True)
class ExitStatus:
    """How an attempt ended: the first failing worker's exit code (128 + signal when killed), else 0."""

    code: int
    reason: str = ""
    #: CPU seconds the workers used (user + system), when the executor knows it.
    cpu_seconds: float = 0.0
    per_worker: tuple[int, ...] = field(default=())
    #: When the last worker exited (wall clock ns), when the executor recorded it; 0: unknown (use "now").
    ended_ns: int = 0

    @property
    def lost(self) -> bool:
        return self.code == EXIT_LOST


class Run(Protocol):
    """A launched (or re-adopted) attempt."""

    @property
    def workers(self) -> Sequence[WorkerRef]: ...

    @property
    def ref(self) -> str:
        """Human-readable handle for Placement.executor_ref (e.g. "pid 1234" or "pids 1234,1240")."""
        ...

    def done(self) -> bool:
        """Whether every worker has exited already."""
        ...

    async def wait(self) -> ExitStatus:
        """Waits until every worker has exited (a failing worker stops the others at once)."""
        ...

    async def stop(self, grace_seconds: float) -> None:
        """SIGTERM to every worker (it checkpoints), SIGKILL to what is left after ``grace_seconds``. Returns once
        the signals are sent; ``wait`` reports the outcome."""
        ...


class Executor(Protocol):
    """Runs attempts of admitted jobs. Implementations: LocalExecutor (processes on this machine); a Ray executor
    later (a pool backed by a Ray cluster; a gang as a placement group)."""

    kind: str

    async def launch(self, request: LaunchRequest) -> Run:
        """Starts every worker of the attempt, or none (a failure stops those already started)."""
        ...

    async def adopt(self, request: LaunchRequest, workers: Sequence[WorkerRef]) -> Run | None:
        """The attempt's run found again after a restart: still running, or already ended (its recorded exit status
        is what ``wait`` returns). None when the executor finds no trace of it (never started)."""
        ...

    async def close(self) -> None:
        """Stops watching runs; the runs themselves keep going (a restarted scheduler adopts them)."""
        ...
