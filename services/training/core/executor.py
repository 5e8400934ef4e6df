"""How runners are launched: the Executor Protocol (the scheduler's executor interface) and LocalExecutor, which
runs each runner as its own OS process on this machine."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from services.mesh.files import private_dir

__all__ = ["ExecutionHandle", "Executor", "LocalExecutor", "LocalHandle", "runner_environment"]

log = logging.getLogger(__name__)

#: Longest stdout line a runner may print (an event); longer lines are cut.
_LINE_LIMIT = 4 * 1024 * 1024


class ExecutionHandle(Protocol):
    """A launched runner."""

    @property
    def pid(self) -> int: ...

    def lines(self) -> AsyncIterator[str]:
        """The runner's stdout, line by line, until it closes."""
        ...

    async def wait(self) -> int:
        """Waits for the runner to exit; its exit code."""
        ...

    def terminate(self) -> None:
        """Asks the runner to stop (SIGTERM: it checkpoints, then exits 130)."""
        ...

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the runner used; complete once wait() returned."""
        ...


class Executor(Protocol):
    """Launches a job's runner: argv in workdir with env (the scheduler will place it on a node)."""

    async def submit(
        self, job_id: str, argv: Sequence[str], env: Mapping[str, str], workdir: Path
    ) -> ExecutionHandle: ...


class LocalHandle:
    """A runner process started by LocalExecutor; its stderr goes to <workdir>/runner.log."""

    def __init__(self, process: asyncio.subprocess.Process, meter: _ChildCpuMeter) -> None:
        self._process = process
        self._meter = meter
        self._cpu = 0.0

    @property
    def pid(self) -> int:
        return self._process.pid

    async def lines(self) -> AsyncIterator[str]:
        stream = self._process.stdout
        assert stream is not None
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line above the limit: skip what was buffered of it
                line = b"\n"
            if not line:
                return
            yield line.decode("utf-8", "replace").rstrip("\n")

    async def wait(self) -> int:
        code = await self._process.wait()
        self._cpu = self._meter.delta()
        return code

    def terminate(self) -> None:
        if self._process.returncode is None:
            try:
                self._process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def cpu_seconds(self) -> float:
        return self._cpu


class _ChildCpuMeter:
    """CPU time of reaped children since the previous reading: read right after a runner is reaped, with the
    runners as the service's only CPU-heavy children (an estimate when two runners end at the same instant)."""

    def __init__(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._seen = usage.ru_utime + usage.ru_stime

    def delta(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        total = usage.ru_utime + usage.ru_stime
        delta, self._seen = max(total - self._seen, 0.0), total
        return delta


class LocalExecutor:
    """Runs each runner as a child process of the service, in its own session (so signals reach it alone)."""

    def __init__(self) -> None:
        self._meter = _ChildCpuMeter()

    async def submit(self, job_id: str, argv: Sequence[str], env: Mapping[str, str], workdir: Path) -> LocalHandle:
        private_dir(workdir)
        with (workdir / "runner.log").open("ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=str(workdir),
                env=dict(env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
                limit=_LINE_LIMIT,
            )
        log.info("job %s: runner started (pid %d)", job_id, process.pid)
        return LocalHandle(process, self._meter)


def runner_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The service's environment minus its own settings and credentials (the database's too), plus ``extra``."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("AIDC_", "AWS_", "PG"))}
    keep.update(extra)
    return keep
