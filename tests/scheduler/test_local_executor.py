"""The local executor on real processes: exit status recorded by the launcher, adoption by a fresh executor (as after
a restart) checked by pid and start time, a gang stopped as a whole, SIGKILL after the grace period."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
from dataclasses import replace
from pathlib import Path

from services.scheduler.core import Resources
from services.scheduler.executors import EXIT_LOST, LaunchRequest, LocalExecutor
from services.scheduler.executors.base import attempt_dir
from tests.scheduler.service_support import runner_command


def _request(tmp_path: Path, command: list[str], nodes: tuple[str, ...] = ("n1",)) -> LaunchRequest:
    return LaunchRequest("j-1", 1, tuple(command), {"PATH": os.environ["PATH"]}, tmp_path / "job", nodes)


async def _started(request: LaunchRequest) -> None:
    """Until the runner wrote its start event, i.e. its SIGTERM handling is set (a fixed sleep could end before a
    loaded machine even started Python, and a SIGTERM then meets the default handler)."""
    events = request.job_dir / "events-0.jsonl"
    for _ in range(600):
        if events.exists() and '"start"' in events.read_text():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the runner never started: no start event in {events}")


async def test_a_fresh_executor_adopts_a_running_worker_and_learns_its_exit_code(tmp_path: Path) -> None:
    request = _request(tmp_path, runner_command(600, 0.05))
    run = await LocalExecutor().launch(request)
    await _started(request)
    adopted = await LocalExecutor(poll_seconds=0.05).adopt(request, run.workers)
    assert adopted is not None and not adopted.done()
    await adopted.stop(5)
    status = await adopted.wait()
    assert status.code == 143 and status.ended_ns > 0  # checkpointed on SIGTERM, exit recorded by the launcher
    assert (await run.wait()).code == 143  # the original parent reaps it too


async def test_adoption_finds_launched_workers_without_refs_and_refuses_a_reused_pid(tmp_path: Path) -> None:
    request = _request(tmp_path, runner_command(600, 0.05))
    run = await LocalExecutor().launch(request)
    await _started(request)
    # Started but not recorded (the scheduler died in between): the launcher's pid file tells.
    found = await LocalExecutor().adopt(request, ())
    assert found is not None and [w.handle for w in found.workers] == [w.handle for w in run.workers]
    # A pid whose start time differs is another process: never signalled, the worker counts as lost.
    [ref] = run.workers
    impostor = await LocalExecutor(poll_seconds=0.05).adopt(request, [replace(ref, incarnation="1")])
    assert impostor is not None and impostor.done()
    await impostor.stop(0)
    assert (await impostor.wait()).code == EXIT_LOST
    await asyncio.sleep(0.3)
    assert not run.done()  # the real worker never got the impostor's signals
    assert (await LocalExecutor().adopt(replace(request, attempt=9), ())) is None
    os.killpg(int(ref.handle), signal.SIGKILL)
    assert (await run.wait()).code == 137


async def test_one_failing_worker_stops_the_rest_of_its_gang(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-c",
        "import os, pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
        "ready = pathlib.Path('worker-0.ready')\n"
        "if os.environ['AIDC_WORKER_INDEX'] == '0': ready.touch()\n"
        "while not ready.exists(): time.sleep(0.05)\n"  # worker 1 fails once worker 0 handles SIGTERM
        "if os.environ['AIDC_WORKER_INDEX'] == '1': sys.exit(3)\n"
        "time.sleep(60)",
    ]
    run = await LocalExecutor().launch(_request(tmp_path, command, ("n1", "n2")))
    status = await asyncio.wait_for(run.wait(), 30)
    assert status.per_worker == (7, 3) and status.code == 7
    assert "worker 1: exit code 3" in status.reason


async def test_a_worker_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    request = _request(tmp_path, runner_command(600, 0.05, "--ignore-term"))
    run = await LocalExecutor().launch(request)
    await _started(request)
    started = asyncio.get_running_loop().time()
    await run.stop(0.5)
    status = await asyncio.wait_for(run.wait(), 30)
    assert status.code == 137 and asyncio.get_running_loop().time() - started >= 0.5


async def test_a_program_that_cannot_start_fails_with_127(tmp_path: Path) -> None:
    run = await LocalExecutor().launch(_request(tmp_path, ["/nonexistent/program"]))
    status = await asyncio.wait_for(run.wait(), 30)
    assert status.code == 127 and "could not start" in status.reason


_MIB = 2**20

#: Prints its data-segment limit, takes 64 MiB, then tries 1 GiB: exit 3 when that allocation is refused.
_ALLOCATING = (
    "import resource, sys\n"
    "print(resource.getrlimit(resource.RLIMIT_DATA)[0], flush=True)\n"
    "held = bytearray(64 << 20)\n"
    "try:\n"
    "    more = bytearray(1 << 30)\n"
    "except MemoryError:\n"
    "    sys.exit(3)\n"
)


async def _allocating(tmp_path: Path, per_worker: Resources) -> tuple[int, str]:
    request = replace(_request(tmp_path, [sys.executable, "-c", _ALLOCATING]), per_worker=per_worker)
    status = await asyncio.wait_for((await LocalExecutor().launch(request)).wait(), 30)
    output = (attempt_dir(request.files_dir, 1) / "worker-0.stdout").read_text().strip()
    return status.code, output


async def test_a_worker_may_not_allocate_more_than_the_memory_it_was_admitted_with(tmp_path: Path) -> None:
    code, limit = await _allocating(tmp_path / "limited", Resources(1000, 256 * _MIB))
    assert limit == str(256 * _MIB) and code == 3  # 64 MiB fit in its 256, 1 GiB more did not
    # Without a memory request, or on a GPU (CUDA maps large private regions), the worker is not limited.
    for name, unlimited in (("none", Resources(1000)), ("gpu", Resources(1000, 256 * _MIB, 1))):
        code, limit = await _allocating(tmp_path / name, unlimited)
        assert (code, int(limit)) == (0, resource.RLIM_INFINITY), name


async def test_a_worker_that_aborts_under_its_memory_limit_is_said_to_have_been_limited(tmp_path: Path) -> None:
    request = replace(
        _request(tmp_path, [sys.executable, "-c", "import os; os.abort()"]), per_worker=Resources(1000, 512 * _MIB)
    )
    status = await asyncio.wait_for((await LocalExecutor().launch(request)).wait(), 30)
    assert status.code == 134 and f"its memory was limited to its request, {512 * _MIB} bytes" in status.reason
