"""The committed sample export (model_repository/sample) for serving tests and benchmarks: requests in the
deployment contract (TEXT, INPUT_IDS/ATTENTION_MASK) and the reference the served answers must equal (the export's
own TorchScript on Hugging Face's tokenization)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc

from services.serving.repository import TEXT_CLASSIFIER_MODEL, ExportBundle

__all__ = [
    "OBVIOUS_TEXTS",
    "SAMPLE_DIR",
    "SampleReference",
    "copy_sample",
    "ids_inputs",
    "load_text_classifier",
    "text_input",
]

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DIR = ROOT / "model_repository" / "sample"
PYTHON_BACKEND_DIR = ROOT / ".runtime" / "pytriton" / "tritonserver" / "backends" / "python"

#: Sentences whose class a keyword decides, with that class.
OBVIOUS_TEXTS: tuple[tuple[str, str], ...] = (
    ("the weather was wonderful today", "positive"),
    ("our team looked really terrible this morning", "negative"),
    ("the meeting is scheduled for today", "neutral"),
    ("a superb and delightful book", "positive"),
    ("that package was awful", "negative"),
    ("the river was measured yesterday", "neutral"),
)


def copy_sample(destination: Path) -> Path:
    """A private copy of the sample export (tests that change or break an export must not touch the committed
    one)."""
    return Path(shutil.copytree(SAMPLE_DIR, destination, ignore=shutil.ignore_patterns("*.py", "__pycache__")))


def text_input(texts: Sequence[str]) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("TEXT", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[text.encode()] for text in texts], dtype=np.object_))
    return tensor


def ids_inputs(ids: np.ndarray, mask: np.ndarray | None = None) -> list[triton_grpc.InferInput]:
    tensors = []
    for name, value in (("INPUT_IDS", ids), ("ATTENTION_MASK", mask)):
        if value is not None:
            tensor = triton_grpc.InferInput(name, list(value.shape), "INT64")
            tensor.set_data_from_numpy(value.astype(np.int64))
            tensors.append(tensor)
    return tensors


@dataclass(frozen=True)
class SampleReference:
    """What a served export must answer: its model.pt run by torch on the ids of its Hugging Face tokenizer."""

    bundle: ExportBundle

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.bundle.root / "tokenizer")

    @cached_property
    def model(self) -> Any:
        import torch

        return torch.jit.load(str(self.bundle.root / "model.pt"), map_location="cpu")

    def encode(self, texts: Sequence[str], padding: bool | str = True) -> tuple[np.ndarray, np.ndarray]:
        max_length = self.bundle.config["max_sequence_length"]
        encoded = self.tokenizer(
            list(texts), truncation=True, max_length=max_length, padding=padding, return_tensors="np"
        )
        return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    def text_logits(self, texts: Sequence[str]) -> np.ndarray:
        """Each text alone (no padding), as a client tokenizing for itself would send it."""
        return np.concatenate([self.logits(*self.encode([text])) for text in texts])


def load_text_classifier() -> ModuleType:
    """model_repository/text_classifier/model.py imported outside Triton, with the python backend's own
    triton_python_backend_utils (pure Python) on the path: its tokenizer setup can be compared with Hugging Face's
    directly."""
    if str(PYTHON_BACKEND_DIR) not in sys.path:
        sys.path.append(str(PYTHON_BACKEND_DIR))
    spec = importlib.util.spec_from_file_location("aidc_text_classifier_model", TEXT_CLASSIFIER_MODEL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
