"""TorchScript export of a trained classifier (traced, frozen, optionally int8), its parity check against the eager
model on held-out batches, and the package the serving side builds a Triton model from."""

from __future__ import annotations

import io
import json
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.training.runner.data import EncodedExamples, collate
from services.training.runner.spec import DEFAULT_PARITY_TOLERANCE, FineTuneSpec
from services.training.runner.store import ArtifactStore

__all__ = [
    "EXPORT_PREFIX",
    "ExportResult",
    "LogitsOnly",
    "ParityError",
    "ParityReport",
    "export_model",
    "standard_module",
]

EXPORT_PREFIX = "export/"
MODEL_FILE = "model.pt"
CONFIG_FILE = "model_config.json"
LABELS_FILE = "labels.json"
TOKENIZER_DIR = "tokenizer"


class LogitsOnly(nn.Module):
    """(input_ids, attention_mask) -> logits: the traceable face of a Hugging Face classifier.

    transformers 5.x ignores torchscript=True, so the tuple output is asked for explicitly.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


def standard_module(model: nn.Module) -> nn.Module:
    """The plain transformers model: opacus's per-sample hooks removed, LoRA adapters merged into the weights."""
    to_standard = getattr(model, "to_standard_module", None)
    if callable(to_standard):
        model = to_standard()
    merge = getattr(model, "merge_and_unload", None)
    if callable(merge):
        model = merge()
    return model


@dataclass(frozen=True)
class ParityReport:
    """How far the exported (reloaded) TorchScript logits are from the eager fp32 model's on held-out batches.

    For int8, max_abs_diff includes the quantization error (checked against the int8 tolerance) and
    trace_max_abs_diff isolates the trace itself (against the eager int8 model, checked against the fp32 bound).
    """

    max_abs_diff: float
    tolerance: float
    trace_max_abs_diff: float
    trace_tolerance: float
    argmax_agreement: float
    batches: int
    examples: int
    reference: str
    passed: bool


class ParityError(Exception):
    def __init__(self, report: ParityReport) -> None:
        super().__init__(
            f"exported model differs from the eager model: max |Δlogit| {report.max_abs_diff:.3g} "
            f"(tolerance {report.tolerance:.3g}), trace alone {report.trace_max_abs_diff:.3g}"
        )
        self.report = report


@dataclass(frozen=True)
class ExportResult:
    artifacts: dict[str, int]
    size_bytes: int
    model_bytes: int
    quantization: str
    frozen: bool
    parity: ParityReport
    config: dict[str, Any]


def export_model(
    model: nn.Module,
    tokenizer: Any,
    labels: tuple[str, ...],
    spec: FineTuneSpec,
    held_out: EncodedExamples,
    store: ArtifactStore,
    max_parity_batches: int = 4,
) -> ExportResult:
    """Trace, check parity, and (only if it passes) publish model.pt, the tokenizer and the configs under export/."""
    pad_id = int(tokenizer.pad_token_id or 0)
    batches = _parity_batches(held_out, pad_id, spec.max_seq_length, min(spec.batch_size, 8), max_parity_batches)
    # The reference is the model as trained and evaluated (LoRA unmerged, opacus-wrapped), so the check covers the
    # merge and the unwrapping as well as the trace.
    model = model.cpu().eval()
    with torch.inference_mode():
        reference = [LogitsOnly(model).eval()(ids, mask).clone() for ids, mask in batches]
    eager = LogitsOnly(standard_module(model).eval()).eval()
    quantization = "none"
    target: nn.Module = eager
    if spec.int8_export:
        # Quantize the eager model, then trace: quantizing a traced module silently does nothing.
        target = torch.ao.quantization.quantize_dynamic(eager, {nn.Linear}, dtype=torch.qint8)
        quantization = "int8-dynamic"
    example = collate(held_out, list(range(min(2, len(held_out)))), pad_id, pad_to=spec.max_seq_length)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python-level shape checks in transformers
        traced = torch.jit.trace(target, (example.input_ids, example.attention_mask))
        frozen = True
        try:
            scripted: torch.jit.ScriptModule = torch.jit.freeze(traced)
        except RuntimeError:
            scripted, frozen = traced, False
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    model_bytes = buffer.getvalue()
    # Check the bytes serving will load, not the in-memory module.
    reloaded = torch.jit.load(io.BytesIO(model_bytes), map_location="cpu")
    parity = _check_parity(reloaded, reference, target, batches, spec)
    if not parity.passed:
        raise ParityError(parity)

    artifacts: dict[str, int] = {}
    artifacts[EXPORT_PREFIX + MODEL_FILE] = store.put(EXPORT_PREFIX + MODEL_FILE, model_bytes)
    tokenizer_files = _put_tokenizer(tokenizer, store, artifacts)
    config = _serving_config(labels, spec, quantization, frozen, pad_id, tokenizer_files, parity)
    artifacts[EXPORT_PREFIX + CONFIG_FILE] = store.put(
        EXPORT_PREFIX + CONFIG_FILE, json.dumps(config, indent=2).encode()
    )
    artifacts[EXPORT_PREFIX + LABELS_FILE] = store.put(EXPORT_PREFIX + LABELS_FILE, json.dumps(list(labels)).encode())
    return ExportResult(
        artifacts=artifacts,
        size_bytes=sum(artifacts.values()),
        model_bytes=len(model_bytes),
        quantization=quantization,
        frozen=frozen,
        parity=parity,
        config=config,
    )


def _parity_batches(
    held_out: EncodedExamples, pad_id: int, max_length: int, batch_size: int, count: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out batches alternating the serving shape (padded to max length) and dynamic padding of other sizes,
    so a trace that baked in a shape fails here rather than in Triton."""
    out = []
    start = 0
    for i in range(count):
        size = batch_size if i % 2 == 0 else max(1, batch_size - 3)
        indices = list(range(start, min(start + size, len(held_out))))
        if not indices:
            break
        start += len(indices)
        batch = collate(held_out, indices, pad_id, pad_to=max_length if i % 2 == 0 else None)
        out.append((batch.input_ids, batch.attention_mask))
    return out


def _check_parity(
    exported: torch.jit.ScriptModule,
    reference: list[torch.Tensor],
    eager_target: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    spec: FineTuneSpec,
) -> ParityReport:
    worst = trace_worst = 0.0
    agree = examples = 0
    with torch.inference_mode():
        for (ids, mask), want in zip(batches, reference, strict=True):
            got = exported(ids, mask)
            worst = max(worst, float((got - want).abs().max()))
            # The trace alone: the exported module against the eager module it was traced from.
            trace_worst = max(trace_worst, float((got - eager_target(ids, mask)).abs().max()))
            agree += int((got.argmax(dim=-1) == want.argmax(dim=-1)).sum())
            examples += int(ids.shape[0])
    tolerance = spec.effective_parity_tolerance
    trace_tolerance = min(tolerance, DEFAULT_PARITY_TOLERANCE)
    return ParityReport(
        max_abs_diff=worst,
        tolerance=tolerance,
        trace_max_abs_diff=trace_worst,
        trace_tolerance=trace_tolerance,
        argmax_agreement=agree / examples if examples else 0.0,
        batches=len(batches),
        examples=examples,
        reference="eager fp32 model as trained",
        passed=bool(batches) and worst <= tolerance and trace_worst <= trace_tolerance,
    )


def _put_tokenizer(tokenizer: Any, store: ArtifactStore, artifacts: dict[str, int]) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        names = sorted(p.name for p in Path(tmp).iterdir() if p.is_file())
        for name in names:
            key = f"{EXPORT_PREFIX}{TOKENIZER_DIR}/{name}"
            artifacts[key] = store.put(key, (Path(tmp) / name).read_bytes())
    return names


def _serving_config(
    labels: tuple[str, ...],
    spec: FineTuneSpec,
    quantization: str,
    frozen: bool,
    pad_id: int,
    tokenizer_files: list[str],
    parity: ParityReport,
) -> dict[str, Any]:
    """What a Triton model config needs: the forward's inputs and output (names, dtypes, dims with -1 dynamic)."""
    return {
        "format": "torchscript",
        "file": MODEL_FILE,
        "task": "sequence-classification",
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": [-1, -1], "libtorch_name": "INPUT__0"},
            {"name": "attention_mask", "dtype": "int64", "shape": [-1, -1], "libtorch_name": "INPUT__1"},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, len(labels)], "libtorch_name": "OUTPUT__0"}],
        "max_sequence_length": spec.max_seq_length,
        "num_labels": len(labels),
        "labels": list(labels),
        "quantization": quantization,
        "frozen": frozen,
        "tokenizer": {"dir": TOKENIZER_DIR, "files": tokenizer_files, "pad_token_id": pad_id},
        "torch_version": torch.__version__,
        "parity": asdict(parity),
    }
