"""A fine-tune trained data-parallel on a Ray cluster: this process is the Ray driver the scheduler starts on its
machine (ExecutorSpec.driver) with the same arguments as the one-process runner; Ray Train's TorchTrainer runs the
ranks (DDP: gloo on CPU, NCCL on GPU) in a placement group pinned to the nodes the scheduler admitted
(AIDC_RAY_PLACEMENT), all at once or not at all.

    python -m services.training.runner.distributed --job-dir DIR --spec spec.json --dataset PATH

The ranks talk to this driver through one small actor (RunChannel): rank 0's events, its writes to the job's
artifact store (checkpoints, TensorBoard files, the export, result.json) and, back, the cancel request and the
checkpoint to resume from. So the job's directory stays where the one-process runner keeps it (the training service
publishes the export from there, once, as for any run); a worker node that dies loses nothing saved, and the next
attempt resumes from the last checkpoint on whatever nodes the scheduler admits it to. No credential enters Ray: the
ranks need none (the dataset is handed to them, the store is this driver's). The dataset goes into Ray's object store
in parts read (and, sealed in the job's directory, opened) one at a time, and each rank stages it part by part: no
process holds the whole file.

stdout carries the event protocol, as the one-process runner's; exit codes are the same, plus EXIT_WORKER_LOST
(a rank died without saying why, e.g. with its node: the scheduler asks Ray whether its node was lost).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from services.scheduler.executors.ray_placement import EXIT_WORKER_LOST, Placement
from services.training.runner.data import DatasetSource
from services.training.runner.events import Cancelled, CancelToken, JsonLinesSink, RunnerEvent, StateChanged
from services.training.runner.main import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_PARITY,
    build_parser,
    failed,
)
from services.training.runner.preflight import InvalidJob, check, prepare
from services.training.runner.sealed import dataset_source
from services.training.runner.spec import FineTuneSpec
from services.training.runner.store import LocalArtifactStore
from services.training.runner.tracing import EXPORTER_VARIABLES, carrier, traced_run

__all__ = ["PartsSource", "main", "put_dataset", "train_rank"]

log = logging.getLogger(__name__)

_DRAIN_SECONDS = 0.3
#: Artifacts a resumed run reads: the pointer, the checkpoint it names, and the best weights so far.
_RESUME = ("checkpoints/latest.json", "checkpoints/best.pt")


def put_dataset(source: DatasetSource, put: Callable[[bytes], Any]) -> list[Any]:
    """The dataset as objects in Ray's store (``put`` is ray.put), one per chunk of the source (1 MiB), read and put one
    at a time: the driver never holds more than a chunk, and the job's key never enters Ray."""
    return [put(chunk) for chunk in source.chunks()]


@dataclass(frozen=True)
class PartsSource:
    """A rank's dataset: the driver's parts, fetched one at a time as the parser reads (``get`` is ray.get)."""

    name: str
    parts: Sequence[Any]
    get: Callable[[Any], bytes]

    def chunks(self) -> Iterator[bytes]:
        for part in self.parts:
            yield self.get(part)


class _RunChannel:
    """Ray actor between the ranks and the driver (created with ray.remote in ``main``)."""

    def __init__(self) -> None:
        #: The store as it was when the run started (what every rank resumes from), and as rank 0 changes it.
        self.seeded: dict[str, bytes] = {}
        self.files: dict[str, bytes] = {}
        self.ops: list[tuple[str, str, bytes | None]] = []
        self.lines: list[str] = []
        self.cancelled = False
        self.outcome: tuple[str, str] | None = None

    # the ranks' side
    def emit(self, line: str) -> None:
        self.lines.append(line)

    def put(self, name: str, data: bytes) -> int:
        self.files[name] = data
        self.ops.append(("put", name, data))
        return len(data)

    def delete(self, name: str) -> None:
        self.files.pop(name, None)
        self.ops.append(("delete", name, None))

    def get(self, name: str, current: bool) -> bytes | None:
        return (self.files if current else self.seeded).get(name)

    def names(self, current: bool) -> list[str]:
        return sorted(self.files if current else self.seeded)

    def is_cancelled(self) -> bool:
        return self.cancelled

    def finish(self, outcome: str, message: str) -> None:
        self.outcome = (outcome, message)

    # the driver's side
    def seed(self, name: str, data: bytes) -> None:
        self.files[name] = self.seeded[name] = data

    def cancel(self) -> None:
        self.cancelled = True

    def drain(self) -> tuple[list[str], list[tuple[str, str, bytes | None]], tuple[str, str] | None]:
        lines, ops = self.lines, self.ops
        self.lines, self.ops = [], []
        return lines, ops, self.outcome


class _ChannelStore:
    """ArtifactStore of a rank: rank 0's writes go to the driver's store through the channel, and it reads the store
    as it changes it; the other ranks' writes are dropped (they hold the same state: one copy is kept) and they read
    the store as it was at the start, so every rank resumes from the same checkpoint whatever rank 0 saved since."""

    def __init__(self, channel: Any, writer: bool) -> None:
        self._channel = channel
        self._writer = writer

    def _get(self, name: str) -> bytes | None:
        import ray

        return ray.get(self._channel.get.remote(name, self._writer))  # type: ignore[no-any-return]

    def put(self, name: str, data: bytes | BinaryIO) -> int:
        import ray

        payload = bytes(data) if isinstance(data, bytes | bytearray | memoryview) else data.read()
        if not self._writer:
            return len(payload)
        return int(ray.get(self._channel.put.remote(name, payload)))

    def get(self, name: str) -> bytes:
        data = self._get(name)
        if data is None:
            raise KeyError(name)
        return data

    def open(self, name: str) -> BinaryIO:
        import io

        return io.BytesIO(self.get(name))

    def exists(self, name: str) -> bool:
        return self._get(name) is not None

    def size(self, name: str) -> int:
        return len(self.get(name))

    def list(self, prefix: str = "") -> list[str]:
        import ray

        return [n for n in ray.get(self._channel.names.remote(self._writer)) if n.startswith(prefix)]

    def delete(self, name: str) -> None:
        if self._writer:
            import ray

            ray.get(self._channel.delete.remote(name))


class _ChannelLines:
    """A text stream whose lines go to the driver (rank 0's JsonLinesSink writes here)."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self._channel.emit.remote(line)
        return len(text)

    def flush(self) -> None:
        return None


class _Discard:
    def emit(self, event: RunnerEvent) -> None:
        return None


def _watch_cancel(channel: Any, token: CancelToken, stop: threading.Event) -> None:
    import ray

    while not stop.wait(0.5):
        try:
            if ray.get(channel.is_cancelled.remote()):
                token.cancel()
                return
        except Exception:  # noqa: BLE001 - the channel gone: the run is ending anyway
            return


def train_rank(config: dict[str, Any]) -> None:
    """One rank (run by TorchTrainer in a Ray worker, with torch.distributed set up)."""
    import ray
    import ray.train
    import torch

    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(int(config["threads"]))
    channel = config["channel"]
    spec = FineTuneSpec.from_json(config["spec"])
    source = PartsSource(config["dataset_name"], config["dataset"], ray.get)
    store = _ChannelStore(channel, writer=rank == 0)
    cancel = CancelToken()
    stop = threading.Event()
    threading.Thread(target=_watch_cancel, args=(channel, cancel, stop), daemon=True).start()
    # Scratch space of this rank on its node (TensorBoard's files before rank 0 stores them), removed at the end.
    workdir = Path(tempfile.mkdtemp(prefix=f"aidc-{config['job']}-rank-{rank}-"))
    attributes: dict[str, str | int] = {"aidc.training.rank": rank, "aidc.training.world_size": config["world_size"]}
    try:
        with traced_run(config["trace_env"], f"runner: rank {rank}", attributes):
            _train(rank, spec, source, store, channel, cancel, workdir, float(config["progress_interval"]))
    finally:
        stop.set()
        shutil.rmtree(workdir, ignore_errors=True)


def _train(
    rank: int,
    spec: FineTuneSpec,
    source: DatasetSource,
    store: _ChannelStore,
    channel: Any,
    cancel: CancelToken,
    workdir: Path,
    progress_interval: float,
) -> None:
    import ray

    from services.training.runner.job import DATA_DIR, run_job
    from services.training.runner.train import Trainer

    try:
        if rank == 0:
            sink = JsonLinesSink(_ChannelLines(channel))  # type: ignore[arg-type]
            run_job(spec, source, store, sink, cancel, workdir, progress_interval)
            ray.get(channel.finish.remote("succeeded", ""))
        else:
            # The same training in lockstep; rank 0 alone exports (run_job) and writes.
            with prepare(spec, source, workdir / DATA_DIR) as job:
                Trainer(job, store, _Discard(), cancel, workdir).train()
    except Cancelled as exc:
        if rank == 0:
            ray.get(channel.finish.remote("cancelled", exc.args[0] if exc.args else ""))
    except InvalidJob as exc:
        if rank == 0:
            ray.get(channel.finish.remote("invalid", str(exc)))
        raise
    except Exception as exc:
        if rank == 0:
            from services.training.runner.export import ParityError

            outcome = "parity" if isinstance(exc, ParityError) else "lost" if _peer_lost(exc) else "failed"
            ray.get(channel.finish.remote(outcome, f"{type(exc).__name__}: {exc}"))
        raise


def _peer_lost(exc: BaseException) -> bool:
    """Whether a collective failed because another rank went away (its process, or its node), not by the job's
    fault: then the scheduler asks Ray whether a node died (EXIT_WORKER_LOST) rather than failing the job."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):  # NCCL's and the rendezvous store's errors
        return True
    # gloo's transport errors ("Connection closed by peer", "Read error ... reset by peer") are plain RuntimeErrors
    # naming their source.
    return isinstance(exc, RuntimeError) and "gloo/transport" in str(exc)


class _Driver:
    """Drains the channel into this process's stdout and the job's store."""

    def __init__(self, channel: Any, store: LocalArtifactStore, out: TextIO) -> None:
        self.channel = channel
        self.store = store
        self.out = out
        self.outcome: tuple[str, str] | None = None

    def drain(self) -> None:
        import ray

        lines, ops, outcome = ray.get(self.channel.drain.remote())
        for kind, name, data in ops:
            if kind == "put" and data is not None:
                self.store.put(name, data)
            elif kind == "delete":
                self.store.delete(name)
        for line in lines:
            self.out.write(line + "\n")
        self.out.flush()
        self.outcome = outcome or self.outcome

    def follow(self, stop: threading.Event) -> None:
        while not stop.wait(_DRAIN_SECONDS):
            try:
                self.drain()
            except Exception:  # noqa: BLE001 - the channel's node died: the run fails, and is told below
                log.warning("reading the ranks' channel failed", exc_info=True)
                return


def _seed(channel: Any, store: LocalArtifactStore) -> None:
    """What a resumed run reads, handed to the ranks."""
    import json

    import ray

    names = [n for n in _RESUME if store.exists(n)]
    if store.exists(_RESUME[0]):
        names.append(json.loads(store.get(_RESUME[0]))["name"])
    for name in names:
        if store.exists(name):
            ray.get(channel.seed.remote(name, store.get(name)))


def run(args: Any, out: TextIO) -> int:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from services.training.runner.job import finished_result

    sink = JsonLinesSink(out)
    spec = FineTuneSpec.from_json(args.spec.read_bytes())
    if spec.privacy is not None:
        raise InvalidJob("differential privacy trains on one worker (workers: 1)")
    store = LocalArtifactStore(args.job_dir)
    source = dataset_source(args.dataset, os.environ)
    # The job's checks, and its fingerprint, without staging the dataset here: each rank stages its own.
    finished = finished_result(store, check(spec, source).fingerprint)
    if finished is not None:
        sink.emit(StateChanged("succeeded", {"result": "result.json"}))
        return EXIT_OK
    placement = Placement.from_env()
    ray.init(log_to_driver=bool(os.environ.get("AIDC_DEBUG_RANKS")), configure_logging=False)
    here = ray.get_runtime_context().get_node_id()
    channel = (
        ray.remote(num_cpus=0, max_restarts=0)(_RunChannel)
        .options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True))
        .remote()
    )
    # After ray.init, which installs its own SIGTERM handler: the ranks checkpoint and stop together.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: channel.cancel.remote())  # type: ignore[attr-defined]
    _seed(channel, store)
    cpus = placement.resources.get("CPU", 1.0)
    trainer = TorchTrainer(
        train_rank,
        train_loop_config={
            "channel": channel,
            "spec": args.spec.read_bytes(),
            "dataset": put_dataset(source, ray.put),
            "dataset_name": source.name,
            "threads": max(1, int(cpus)),
            "job": os.environ.get("AIDC_JOB_ID", "run"),
            "progress_interval": args.progress_interval,
            "world_size": placement.workers,
            # Where spans go and the driver's span as their parent: each rank's spans join the submission's trace.
            "trace_env": {
                **{k: os.environ[k] for k in EXPORTER_VARIABLES if os.environ.get(k)},
                **carrier(),
                "AIDC_JOB_ID": os.environ.get("AIDC_JOB_ID", ""),
                "AIDC_JOB_ATTEMPT": os.environ.get("AIDC_JOB_ATTEMPT", "0"),
            },
        },
        scaling_config=ScalingConfig(  # type: ignore[call-arg]
            num_workers=placement.workers,
            use_gpu="GPU" in placement.resources,
            resources_per_worker=dict(placement.resources),
            placement_strategy=placement.strategy,
            label_selector=placement.label_selectors(),
        ),
        run_config=RunConfig(
            # One Ray Train run per attempt: an attempt never finds a lost one's state under its name.
            name=f"{os.environ.get('AIDC_JOB_ID', 'fine-tune')}-attempt-{os.environ.get('AIDC_JOB_ATTEMPT', '0')}",
            storage_path=str((args.job_dir / ".ray-train").resolve()),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    driver = _Driver(channel, store, out)
    stop = threading.Event()
    follower = threading.Thread(target=driver.follow, args=(stop,), daemon=True)
    follower.start()
    failure: BaseException | None = None
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - what it means is decided from rank 0's outcome below
        failure = exc
    finally:
        stop.set()
        follower.join()
    try:
        driver.drain()
    except Exception:  # noqa: BLE001
        log.warning("the ranks' channel is gone", exc_info=True)
    outcome, message = driver.outcome or ("", "")
    if outcome == "succeeded":
        return EXIT_OK
    if outcome == "cancelled":
        sink.emit(StateChanged("cancelled", {"checkpoint": message}))
        return EXIT_CANCELLED
    if outcome in ("invalid", "parity", "failed"):
        sink.emit(StateChanged("failed", {"reason": outcome, "message": message}))
        return {"invalid": EXIT_INVALID, "parity": EXIT_PARITY}.get(outcome, EXIT_FAILED)
    # Rank 0 lost a peer, or no word from rank 0: a rank (or its node) died under it.
    log.warning("a worker was lost: %s", message or failure)
    sink.emit(StateChanged("failed", {"reason": "worker_lost", "message": f"a worker was lost: {message or failure}"}))
    return EXIT_WORKER_LOST


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    args = build_parser().parse_args(argv)
    out = stdout or sys.stdout
    sink = JsonLinesSink(out)
    started = time.monotonic()
    try:
        with traced_run(os.environ):
            code = run(args, out)
        log.info("distributed run ended with %d after %.1f s", code, time.monotonic() - started)
        return code
    except InvalidJob as exc:
        sink.emit(StateChanged("failed", {"reason": "invalid_argument", "message": str(exc)}))
        return EXIT_INVALID
    except Exception as exc:
        log.exception("distributed fine-tune failed")
        sink.emit(failed(exc))
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
