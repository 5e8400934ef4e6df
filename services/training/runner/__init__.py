"""The training runner: the ML core of a fine-tune job (data, training loop, checkpoints, export, parity).

Pure Python + torch, no gRPC: the training service launches it as its own process (`python -m
services.training.runner`) and relays the JSON-lines events it prints; tests call run_job in-process. Importing
the package (spec, preflight, events, store) does not import torch; run_job and ParityError load it when first used.

A job's artifacts (names in its ArtifactStore; the job directory with LocalArtifactStore):

    checkpoints/step-SSSSSSSS-epoch-EEEE-BBBBBB.pt   the last two checkpoints (weights or LoRA adapters + head,
                                                     optimizer, scheduler, RNG states, run state, DP accountant)
    checkpoints/latest.json                          {"name", "step", "epoch", "batch_in_epoch"} of the newest
    checkpoints/best.pt                              best weights so far (only with early stopping)
    tensorboard/events.out.tfevents.*                train/*, eval/*, privacy/epsilon scalars
    export/model.pt                                  TorchScript: (input_ids, attention_mask) int64 -> logits fp32
    export/model_config.json                         inputs, outputs, labels, max length, quantization, parity
    export/labels.json                               class names in logit order
    export/tokenizer/*                               the tokenizer files (AutoTokenizer.from_pretrained)
    result.json                                      the job's result (see job.py)
    .work/                                           scratch, not an artifact
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from services.training.runner.data import BytesSource, DatasetSource, LocalFileSource
from services.training.runner.events import (
    Cancelled,
    CancelToken,
    CheckpointSaved,
    CollectingSink,
    EvalReport,
    JsonLinesSink,
    LogLine,
    Progress,
    ProgressSink,
    RunnerEvent,
    StateChanged,
)
from services.training.runner.preflight import InvalidJob, PreparedJob, prepare
from services.training.runner.spec import FineTuneSpec, LoraSettings, PrivacySettings
from services.training.runner.store import ArtifactStore, LocalArtifactStore

#: The environment every runner process is started with, besides its job's: no model download at run time, and one
#: thread for scipy's OpenBLAS, which transformers loads and training never calls (left alone it starts a thread per
#: core with a 32 MiB buffer each: ~90 MiB of every job here). Why the runner loads it first: __main__.py.
RUNNER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OPENBLAS_NUM_THREADS": "1"}
#: The least memory a runner is started with: its own needs (Python, torch, transformers, the tiniest model) take
#: ~400 MiB of data segment before any dataset or real model.
MIN_MEMORY_BYTES = 512 * 2**20

if TYPE_CHECKING:
    from services.training.runner.export import ParityError
    from services.training.runner.job import RESULT_FILE, run_job

__all__ = [
    "RESULT_FILE",
    "MIN_MEMORY_BYTES",
    "RUNNER_ENV",
    "ArtifactStore",
    "BytesSource",
    "CancelToken",
    "Cancelled",
    "CheckpointSaved",
    "CollectingSink",
    "DatasetSource",
    "EvalReport",
    "FineTuneSpec",
    "InvalidJob",
    "JsonLinesSink",
    "LocalArtifactStore",
    "LocalFileSource",
    "LogLine",
    "LoraSettings",
    "ParityError",
    "PreparedJob",
    "PrivacySettings",
    "Progress",
    "ProgressSink",
    "RunnerEvent",
    "StateChanged",
    "prepare",
    "run_job",
]

_LAZY = {
    "RESULT_FILE": "services.training.runner.job",
    "run_job": "services.training.runner.job",
    "ParityError": "services.training.runner.export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
