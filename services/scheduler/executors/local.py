"""LocalExecutor: each worker of a job is a process on this machine, in its own session, started through the
launcher (which records its exit status in a file). Output goes to files in the job's directory, never to a pipe,
so workers outlive a scheduler restart (no SIGPIPE) and a restarted scheduler re-adopts them by pid + start time.

A worker admitted with memory may not allocate more (the launcher's RLIMIT_DATA), so a job that outgrows its request
fails itself rather than the machine's other jobs. A GPU job is not limited that way: CUDA's driver maps large private
regions of address space that such a limit would count as if they were allocated."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.scheduler.executors.base import EXIT_LOST, ExitStatus, LaunchRequest, WorkerRef, attempt_dir

__all__ = ["LocalExecutor", "LocalRun", "attempt_dir", "process_start_ticks"]

log = logging.getLogger(__name__)

_LAUNCHER = Path(__file__).with_name("launcher.py")


def process_start_ticks(pid: int) -> str | None:
    """The process's start time (clock ticks after boot) while it runs; None once it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # fields[0] is the state (after pid and comm); a zombie has exited and only waits to be reaped.
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class _Worker:
    ref: WorkerRef
    files: Path
    process: asyncio.subprocess.Process | None = None  # None once adopted: we are not its parent

    @property
    def pid(self) -> int:
        return int(self.ref.handle)

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.returncode is None
        return process_start_ticks(self.pid) == self.ref.incarnation

    def signal(self, number: int) -> None:
        # The launcher leads the worker's session and process group; re-check the incarnation so a reused pid
        # never receives our signal.
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, number)

    def recorded_status(self) -> dict[str, object] | None:
        return _read_json(self.files.with_suffix(".exit"))


class LocalRun:
    """The workers of one attempt on this machine."""

    def __init__(self, workers: list[_Worker], poll_seconds: float) -> None:
        self._workers = workers
        self._poll = poll_seconds
        self._killers: list[asyncio.Task[None]] = []
        self._status: ExitStatus | None = None
        self._lock = asyncio.Lock()

    @property
    def workers(self) -> Sequence[WorkerRef]:
        return [w.ref for w in self._workers]

    @property
    def ref(self) -> str:
        pids = ",".join(w.ref.handle for w in self._workers)
        return f"pid {pids}" if len(self._workers) == 1 else f"pids {pids}"

    def done(self) -> bool:
        return not any(w.alive() for w in self._workers)

    async def _wait_worker(self, worker: _Worker) -> int:
        if worker.process is not None:
            code = await worker.process.wait()
        else:
            while worker.alive():
                await asyncio.sleep(self._poll)
            code = EXIT_LOST
        recorded = (worker.recorded_status() or {}).get("exit_code")
        if isinstance(recorded, int):
            return recorded
        if worker.process is not None:
            return 128 - code if code < 0 else code  # the launcher itself was killed (SIGKILL)
        return EXIT_LOST

    async def wait(self) -> ExitStatus:
        async with self._lock:
            if self._status is None:
                self._status = await self._wait_all()
            return self._status

    async def _wait_all(self) -> ExitStatus:
        tasks = {asyncio.ensure_future(self._wait_worker(w)): w for w in self._workers}
        codes: dict[int, int] = {}
        stopped = False
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                codes[tasks[task].ref.index] = task.result()
            # A gang is all or nothing: one failed worker stops the others (they checkpoint) at once.
            if not stopped and pending and any(code != 0 for code in codes.values()):
                stopped = True
                for task in pending:
                    tasks[task].signal(signal.SIGTERM)
        for killer in self._killers:
            killer.cancel()
        ordered = tuple(codes[w.ref.index] for w in self._workers)
        failing = next((code for code in ordered if code != 0), 0)
        reasons = []
        cpu = 0.0
        ended = 0
        for worker, code in zip(self._workers, ordered, strict=True):
            recorded = worker.recorded_status() or {}
            cpu += float(recorded.get("cpu_seconds", 0.0) or 0.0)  # type: ignore[arg-type]
            ended = max(ended, int(recorded.get("end_time_ns", 0) or 0))  # type: ignore[call-overload]
            if code == EXIT_LOST:
                reasons.append(f"worker {worker.ref.index} lost (no exit status recorded)")
            elif code != 0:
                reasons.append(f"worker {worker.ref.index}: {recorded.get('reason') or f'exit code {code}'}")
        # A worker without a recorded end (killed with its launcher) ended about now.
        if any(not (w.recorded_status() or {}).get("end_time_ns") for w in self._workers):
            ended = 0
        return ExitStatus(failing, "; ".join(reasons), cpu, ordered, ended)

    async def stop(self, grace_seconds: float) -> None:
        for worker in self._workers:
            worker.signal(signal.SIGTERM)
        self._killers.append(asyncio.create_task(self._kill_after(grace_seconds)))

    async def _kill_after(self, grace_seconds: float) -> None:
        await asyncio.sleep(max(grace_seconds, 0.0))
        for worker in self._workers:
            if worker.alive():
                log.info("worker %s (pid %s) outlived its grace period: SIGKILL", worker.ref.index, worker.pid)
                worker.signal(signal.SIGKILL)


class LocalExecutor:
    """Launches workers as local processes (the scheduler's embedded default)."""

    kind = "local"

    def __init__(self, *, poll_seconds: float = 0.5, python: str = sys.executable) -> None:
        self._poll = poll_seconds
        self._python = python

    async def launch(self, request: LaunchRequest) -> LocalRun:
        directory = attempt_dir(request.files_dir, request.attempt)
        directory.mkdir(parents=True, exist_ok=True)
        cwd = request.cwd or request.job_dir
        limited = request.per_worker.memory_bytes if not request.per_worker.gpus else 0
        memory = (str(limited),) if limited > 0 else ()
        workers: list[_Worker] = []
        try:
            for index, node in enumerate(request.nodes):
                files = directory / f"worker-{index}"
                for suffix in (".exit", ".pid"):
                    files.with_suffix(suffix).unlink(missing_ok=True)
                env = {
                    **request.env,
                    "AIDC_JOB_ID": request.job_id,
                    "AIDC_JOB_ATTEMPT": str(request.attempt),
                    "AIDC_WORKER_INDEX": str(index),
                    "AIDC_WORKERS": str(len(request.nodes)),
                    "AIDC_NODE": node,
                }
                with files.with_suffix(".stdout").open("ab") as out, files.with_suffix(".stderr").open("ab") as err:
                    process = await asyncio.create_subprocess_exec(
                        self._python,
                        "-I",
                        "-S",
                        str(_LAUNCHER),
                        str(files.with_suffix(".exit")),
                        str(files.with_suffix(".pid")),
                        *memory,
                        "--",
                        *request.argv,
                        cwd=str(cwd),
                        env=env,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        start_new_session=True,
                    )
                ticks = process_start_ticks(process.pid) or ""
                workers.append(_Worker(WorkerRef(index, node, str(process.pid), ticks), files, process))
        except BaseException:
            for worker in workers:
                worker.signal(signal.SIGKILL)
            raise
        log.info("job %s attempt %d: %d worker(s) started", request.job_id, request.attempt, len(workers))
        return LocalRun(workers, self._poll)

    async def adopt(self, request: LaunchRequest, workers: Sequence[WorkerRef]) -> LocalRun | None:
        directory = attempt_dir(request.files_dir, request.attempt)
        found = list(workers)
        if not found:
            # Started but not yet recorded when the scheduler stopped: the launchers' own pid files tell.
            for index, node in enumerate(request.nodes):
                launched = _read_json(directory / f"worker-{index}.pid")
                if launched is not None:
                    found.append(WorkerRef(index, node, str(launched["pid"]), str(launched["start_ticks"])))
        if not found:
            return None
        adopted = [_Worker(ref, directory / f"worker-{ref.index}") for ref in found]
        log.info(
            "job %s attempt %d: adopted %d worker(s), %d still running",
            request.job_id,
            request.attempt,
            len(adopted),
            sum(w.alive() for w in adopted),
        )
        return LocalRun(adopted, self._poll)

    async def close(self) -> None:
        return None
