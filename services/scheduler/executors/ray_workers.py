"""The driver of a Ray job that is not a Ray program itself: one process per worker, each started by an actor in
its bundle of a placement group pinned to the worker's admitted node, so the gang starts all at once or not at all.

    python -m services.scheduler.executors.ray_workers --output-dir DIR -- PROGRAM [ARG...]

Worker 0's output is this driver's own (the job's worker-0 files); worker i's goes to DIR/worker-i.stdout/.stderr.
SIGTERM is passed on to every worker (they checkpoint); the first worker that fails stops the others; the exit code
is the first failing worker's. If this driver dies, Ray ends its actors and each worker process dies with its actor.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from services.scheduler.executors.ray_placement import EXIT_WORKER_LOST, Placement, node_name_of

_PLACEMENT_TIMEOUT_SECONDS = float(os.environ.get("AIDC_RAY_PLACEMENT_TIMEOUT_SECONDS", "120"))
_POLL_SECONDS = 0.2
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # The worker process must not outlive its actor (killed by Ray when the driver ends, or with its node).
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@ray.remote(max_restarts=0)
class WorkerProcess:
    """One worker's process on its node, its output kept in files there and read back by the driver."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="aidc-worker-"))
        self._out = (self._dir / "stdout").open("wb")
        self._err = (self._dir / "stderr").open("wb")
        workdir = cwd if cwd and os.path.isdir(cwd) else str(self._dir)
        # Where the worker really runs (its actor's node), as the scheduler names it.
        env = {**env, "AIDC_NODE": node_name_of(ray.get_runtime_context().get_node_id())}
        self._process = subprocess.Popen(
            argv,
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def poll(self, out_offset: int, err_offset: int) -> tuple[bytes, bytes, int | None]:
        code = self._process.poll()
        return self._read("stdout", out_offset), self._read("stderr", err_offset), code

    def _read(self, name: str, offset: int) -> bytes:
        with (self._dir / name).open("rb") as stream:
            stream.seek(offset)
            return stream.read(1 << 20)

    def signal(self, number: int) -> None:
        if self._process.poll() is None:
            try:
                os.killpg(self._process.pid, number)
            except ProcessLookupError:
                pass


class _Worker:
    def __init__(self, index: int, actor: Any, out: IO[bytes], err: IO[bytes]) -> None:
        self.index, self.actor, self.out, self.err = index, actor, out, err
        self.out_offset = self.err_offset = 0
        self.code: int | None = None


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


def run(argv: list[str], output_dir: Path) -> int:
    placement = Placement.from_env()
    stopping = False

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True

    ray.init(log_to_driver=False, configure_logging=False)
    # After ray.init, which installs its own SIGTERM handler (exit at once): the workers must get it first.
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    group = placement_group(
        [dict(placement.resources)] * placement.workers,
        strategy=placement.strategy,
        bundle_label_selector=placement.label_selectors(),
    )
    deadline = time.monotonic() + _PLACEMENT_TIMEOUT_SECONDS
    while True:
        ready, _ = ray.wait([group.ready()], timeout=1.0)
        if ready:
            break
        if stopping or time.monotonic() > deadline:
            remove_placement_group(group)
            print("the gang's placement group was not placed in time", file=sys.stderr, flush=True)
            return 130 if stopping else 1
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "AIDC_RAY_PLACEMENT"}
    workers: list[_Worker] = []
    for index in range(placement.workers):
        worker_env = {**env, "AIDC_WORKER_INDEX": str(index), "AIDC_WORKERS": str(placement.workers)}
        options: dict[str, Any] = {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
            "num_cpus": placement.resources.get("CPU", 0),
        }
        if "memory" in placement.resources:
            options["memory"] = placement.resources["memory"]
        if "GPU" in placement.resources:
            options["num_gpus"] = placement.resources["GPU"]
        actor = WorkerProcess.options(**options).remote(argv, worker_env, os.getcwd())  # type: ignore[attr-defined]
        if index == 0:
            out, err = sys.stdout.buffer, sys.stderr.buffer
        else:
            out = (output_dir / f"worker-{index}.stdout").open("ab")
            err = (output_dir / f"worker-{index}.stderr").open("ab")
        workers.append(_Worker(index, actor, out, err))
    signalled = False
    while any(w.code is None for w in workers):
        failed = any(w.code not in (None, 0) for w in workers)
        if (stopping or failed) and not signalled:
            signalled = True
            for worker in workers:
                if worker.code is None:
                    worker.actor.signal.remote(signal.SIGTERM)
        for worker in workers:
            if worker.code is not None:
                continue
            try:
                out, err, code = ray.get(worker.actor.poll.remote(worker.out_offset, worker.err_offset))
            except ray.exceptions.RayError as exc:
                print(f"worker {worker.index} lost: {type(exc).__name__}", file=sys.stderr, flush=True)
                worker.code = EXIT_WORKER_LOST
                continue
            for data, stream in ((out, worker.out), (err, worker.err)):
                if data:
                    stream.write(data)
                    stream.flush()
            worker.out_offset += len(out)
            worker.err_offset += len(err)
            if code is not None and not out and not err:
                worker.code = _exit_code(code)
        time.sleep(_POLL_SECONDS)
    remove_placement_group(group)
    if any(w.code == EXIT_WORKER_LOST for w in workers):
        return EXIT_WORKER_LOST  # the others were stopped because of the loss: the loss is what happened
    return next((w.code for w in workers if w.code), 0) or 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m services.scheduler.executors.ray_workers")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    return run(command, args.output_dir)


if __name__ == "__main__":
    sys.exit(main())
