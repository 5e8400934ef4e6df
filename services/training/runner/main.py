"""The runner as its own process: python -m services.training.runner --job-dir DIR --spec spec.json --dataset PATH.

stdout carries only the event protocol, one JSON object per line (see events.JsonLinesSink); logs go to stderr.
Exit codes: 0 succeeded, 2 invalid spec or data, 3 parity failure, 130 cancelled (SIGTERM/SIGINT: checkpoint first),
1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TextIO

from services.training.runner.events import Cancelled, CancelToken, JsonLinesSink, StateChanged
from services.training.runner.export import ParityError
from services.training.runner.job import RESULT_FILE, run_job
from services.training.runner.preflight import InvalidJob
from services.training.runner.sealed import dataset_source
from services.training.runner.spec import FineTuneSpec
from services.training.runner.store import LocalArtifactStore
from services.training.runner.tracing import traced_run

__all__ = ["EXIT_CANCELLED", "EXIT_FAILED", "EXIT_INVALID", "EXIT_OK", "EXIT_PARITY", "build_parser", "main"]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_PARITY = 3
EXIT_CANCELLED = 130
WORK_DIR = ".work"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.training.runner", description=__doc__)
    parser.add_argument(
        "--job-dir", type=Path, required=True, help="artifact directory of the job (resumed if it holds checkpoints)"
    )
    parser.add_argument("--spec", type=Path, required=True, help="FineTuneSpec as JSON")
    parser.add_argument("--dataset", type=Path, required=True, help="CSV or JSONL with the text and label columns")
    parser.add_argument("--progress-interval", type=float, default=1.0, help="seconds between progress events")
    return parser


#: What glibc's loader says when a library imported late cannot map its segments under the limit: which one depends
#: on where the limit bites (its writable segment, or its zero-fill pages).
_LOADER_OUT_OF_MEMORY = ("failed to map segment", "cannot map zero-fill pages", "Cannot allocate memory")


def _limited() -> bool:
    return resource.getrlimit(resource.RLIMIT_DATA)[0] != resource.RLIM_INFINITY


def _out_of_memory(exc: BaseException) -> bool:
    # Python's allocations raise MemoryError; torch's CPU allocator raises a RuntimeError naming itself; a thread
    # whose stack cannot be mapped does not start (under a limit, for want of memory: not else).
    return (
        isinstance(exc, MemoryError)
        or (isinstance(exc, RuntimeError) and "DefaultCPUAllocator" in str(exc))
        or (isinstance(exc, RuntimeError) and "can't start new thread" in str(exc) and _limited())
        or (isinstance(exc, ImportError) and any(marker in str(exc) for marker in _LOADER_OUT_OF_MEMORY))
    )


def failed(exc: BaseException) -> StateChanged:
    """The event of a run that failed unexpectedly; running out of memory says so, with the limit and its remedy."""
    if not _out_of_memory(exc):
        return StateChanged("failed", {"reason": "internal", "message": f"{type(exc).__name__}: {exc}"})
    limit = resource.getrlimit(resource.RLIMIT_DATA)[0]
    within = f" (limited to its memory request, {limit / 2**20:.0f} MiB)" if _limited() else ""
    message = f"the run ran out of memory{within}: ask for more (aidc train submit --memory, or compute.memory_bytes)"
    return StateChanged("failed", {"reason": "out_of_memory", "message": message})


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    sink = JsonLinesSink(stdout or sys.stdout)
    cancel = CancelToken()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: cancelling after the current step", signal.Signals(signum).name)
        cancel.cancel()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            spec = FineTuneSpec.from_json(args.spec.read_bytes())
        except OSError as exc:
            raise InvalidJob(f"cannot read the spec: {exc}") from exc
        except ValueError as exc:
            raise InvalidJob(str(exc)) from exc
        store = LocalArtifactStore(args.job_dir)
        with traced_run(os.environ):
            run_job(
                spec,
                dataset_source(args.dataset, os.environ),
                store,
                sink,
                cancel,
                args.job_dir / WORK_DIR,
                args.progress_interval,
            )
        return EXIT_OK
    except InvalidJob as exc:
        sink.emit(StateChanged("failed", {"reason": "invalid_argument", "message": str(exc)}))
        return EXIT_INVALID
    except ParityError as exc:
        sink.emit(StateChanged("failed", {"reason": "parity", "message": str(exc), "result": RESULT_FILE}))
        return EXIT_PARITY
    except Cancelled as exc:
        sink.emit(StateChanged("cancelled", {"checkpoint": exc.checkpoint}))
        return EXIT_CANCELLED
    except Exception as exc:
        log.exception("fine-tune job failed")
        sink.emit(failed(exc))
        return EXIT_FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
