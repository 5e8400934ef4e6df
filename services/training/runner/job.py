"""One fine-tune job end to end: prepare, train (resuming), export, parity, result.json."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from services.training.runner.data import DatasetSource
from services.training.runner.events import Cancelled, CancelToken, LogLine, ProgressSink, StateChanged
from services.training.runner.export import EXPORT_PREFIX, ExportResult, ParityError, export_model
from services.training.runner.preflight import InvalidJob, PreparedJob, prepare
from services.training.runner.spec import FineTuneSpec
from services.training.runner.store import ArtifactStore
from services.training.runner.tracing import phase
from services.training.runner.train import Trainer, TrainOutcome

__all__ = ["DATA_DIR", "RESULT_FILE", "RESULT_SCHEMA_VERSION", "InvalidJob", "finished_result", "run_job"]

RESULT_FILE = "result.json"
RESULT_SCHEMA_VERSION = 1
#: Where, in a job's work directory, its dataset is staged (texts, token ids) while it runs.
DATA_DIR = "data"


def run_job(
    spec: FineTuneSpec,
    source: DatasetSource,
    store: ArtifactStore,
    sink: ProgressSink,
    cancel: CancelToken,
    workdir: Path,
    progress_interval: float = 1.0,
) -> dict[str, Any]:
    """Run (or resume, or recognise as finished) the job; returns the result also stored as result.json.

    Raises InvalidJob before any model is loaded, Cancelled after checkpointing, ParityError after storing a
    result.json whose status is "parity_failed".
    """
    started = time.time()
    sink.emit(StateChanged("preparing"))
    with ExitStack() as staged:
        with phase("load data") as span:
            job = staged.enter_context(prepare(spec, source, workdir / DATA_DIR))
            span.set_attribute("aidc.training.examples", len(job.dataset))
        return _run(job, store, sink, cancel, workdir, progress_interval, started)


def _run(
    job: PreparedJob,
    store: ArtifactStore,
    sink: ProgressSink,
    cancel: CancelToken,
    workdir: Path,
    progress_interval: float,
    started: float,
) -> dict[str, Any]:
    spec = job.spec
    finished = finished_result(store, job.fingerprint)
    if finished is not None:
        sink.emit(LogLine("info", "the job already finished; keeping its result"))
        sink.emit(StateChanged("succeeded", {"result": RESULT_FILE}))
        return finished
    if cancel.cancelled:
        raise Cancelled(None)

    try:
        outcome = Trainer(job, store, sink, cancel, workdir, progress_interval).train()
    except ValueError as exc:
        if "checkpoints of a different job" in str(exc):
            raise InvalidJob(str(exc)) from exc
        raise
    if cancel.cancelled:
        raise Cancelled(None)

    sink.emit(StateChanged("exporting", {"int8": spec.int8_export}))
    try:
        with phase("export", int8=spec.int8_export):
            exported = export_model(outcome.model, outcome.tokenizer, job.labels, spec, outcome.encoded_eval, store)
    except ParityError as exc:
        result = _result(job, outcome, None, store, started, status="parity_failed")
        result["export"] = {"parity": exc.report.__dict__}
        store.put(RESULT_FILE, json.dumps(result, indent=2).encode())
        raise
    sink.emit(StateChanged("checked_parity", {"max_abs_diff": exported.parity.max_abs_diff}))
    result = _result(job, outcome, exported, store, started, status="succeeded")
    store.put(RESULT_FILE, json.dumps(result, indent=2).encode())
    sink.emit(StateChanged("succeeded", {"result": RESULT_FILE}))
    return result


def finished_result(store: ArtifactStore, fingerprint: str) -> dict[str, Any] | None:
    """The result of the job of this fingerprint, if it already succeeded."""
    if not store.exists(RESULT_FILE):
        return None
    result: dict[str, Any] = json.loads(store.get(RESULT_FILE))
    if result.get("status") == "succeeded" and result.get("fingerprint") == fingerprint:
        return result
    return None


def _result(
    job: PreparedJob,
    outcome: TrainOutcome,
    exported: ExportResult | None,
    store: ArtifactStore,
    started: float,
    status: str,
) -> dict[str, Any]:
    import transformers

    wall = time.time() - started
    artifacts = []
    for name in store.list():
        if name == RESULT_FILE:
            continue
        entry: dict[str, Any] = {"name": name, "size_bytes": store.size(name)}
        if name.startswith(EXPORT_PREFIX):
            entry["sha256"] = hashlib.sha256(store.get(name)).hexdigest()
        artifacts.append(entry)
    spec = job.spec
    return {
        "schema_version": RESULT_SCHEMA_VERSION,
        "status": status,
        "fingerprint": job.fingerprint,
        "spec": spec.to_dict(),
        "base_model": {"path": str(job.model_dir), "max_sequence_length": job.model_max_length},
        "dataset": {
            "name": job.dataset.summary.name,
            "format": job.dataset.summary.format,
            "sha256": job.dataset.summary.sha256,
            "size_bytes": job.dataset.summary.size_bytes,
            "rows": len(job.dataset),
            "rows_skipped": job.dataset.summary.rows_skipped,
            "train_examples": len(job.train),
            "eval_examples": len(job.held_out),
        },
        "labels": list(job.labels),
        "metrics": outcome.metrics,
        "history": outcome.history,
        "training": {
            "steps": outcome.steps,
            "total_steps": outcome.total_steps,
            "epochs_completed": outcome.epochs_completed,
            "stopped_early": outcome.stopped_early,
            "best_epoch": outcome.best_epoch,
            "resumed_from_step": outcome.resumed_from_step,
            "train_seconds": outcome.train_seconds,
            "examples_seen": outcome.examples_seen,
            "examples_per_second": outcome.examples_seen / outcome.train_seconds if outcome.train_seconds else 0.0,
            "method": spec.method,
            "mixed_precision": outcome.mixed_precision,
            "trainable_parameters": outcome.trainable_parameters,
            "total_parameters": outcome.total_parameters,
        },
        "privacy": outcome.privacy,
        "export": None
        if exported is None
        else {
            "format": "torchscript",
            "model": EXPORT_PREFIX + "model.pt",
            "config": EXPORT_PREFIX + "model_config.json",
            "quantization": exported.quantization,
            "frozen": exported.frozen,
            "model_bytes": exported.model_bytes,
            "size_bytes": exported.size_bytes,
            "parity": exported.parity.__dict__,
        },
        "artifacts": artifacts,
        "wall_seconds": wall,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": _version("peft"),
            "opacus": _version("opacus"),
        },
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
