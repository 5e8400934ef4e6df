"""Everything that can reject a fine-tune job before compute is spent: the spec against the base model's limits,
the dataset's columns and labels, the split. Imports neither torch nor transformers, so the service can call it."""

from __future__ import annotations

import json
import shutil
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.training.runner.data import (
    DatasetSource,
    DatasetSummary,
    StagedDataset,
    check_split,
    resolve_labels,
    split,
    stage_dataset,
    summarize_dataset,
)
from services.training.runner.spec import FineTuneSpec

__all__ = ["CheckedJob", "InvalidJob", "PreparedJob", "base_model_max_length", "check", "prepare"]


class InvalidJob(ValueError):
    """The spec, base model or dataset cannot make a job (the service answers INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class PreparedJob:
    """A job that passed every check that needs no model weights: the spec, the data (staged on disk), the classes,
    and the split (indices into the data)."""

    spec: FineTuneSpec
    model_dir: Path
    model_max_length: int
    dataset: StagedDataset
    labels: tuple[str, ...]
    train: array[int]
    held_out: array[int]

    @property
    def fingerprint(self) -> str:
        """Identifies the job (spec + data): checkpoints of another job are never resumed."""
        return f"{self.spec.fingerprint()}:{self.dataset.summary.sha256}"


@dataclass(frozen=True)
class CheckedJob:
    """A job that passed prepare's checks, as the service keeps it: the dataset summarized, not loaded."""

    spec: FineTuneSpec
    model_max_length: int
    dataset: DatasetSummary
    labels: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        """PreparedJob's fingerprint of the same job."""
        return f"{self.spec.fingerprint()}:{self.dataset.sha256}"


def base_model_max_length(model_dir: Path) -> int:
    """The longest input the base model accepts, read from its config.json (no weights are loaded)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"base model {model_dir} is not a Hugging Face model directory (no config.json)")
    if not any((model_dir / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise ValueError(f"base model {model_dir} has no weights (model.safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"base model {model_dir}: config.json is not JSON ({exc})") from exc
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"base model {model_dir}: config.json has no max_position_embeddings")
    tokenizer_config = model_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():
        declared = json.loads(tokenizer_config.read_text()).get("model_max_length")
        # Tokenizers without a limit declare a huge sentinel (1e30): only a real, smaller limit counts.
        if isinstance(declared, int) and 0 < declared < limit:
            limit = declared
    return limit


@contextmanager
def prepare(spec: FineTuneSpec, source: DatasetSource, scratch: Path) -> Iterator[PreparedJob]:
    """Every check that can reject a job before compute is spent; InvalidJob (a ValueError) names what is wrong.
    The dataset streams into ``scratch`` (its texts, then its token ids), which is removed when the job is done
    with it."""
    try:
        with _refusals():
            model_dir, max_length = _check_spec(spec)
            dataset = stage_dataset(source, spec.text_column, spec.label_column, scratch)
            labels = resolve_labels(dataset.summary.label_counts, spec.labels)
            train, held_out = split(dataset, spec.eval_fraction, spec.seed)
        yield PreparedJob(spec, model_dir, max_length, dataset, labels, train, held_out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check(spec: FineTuneSpec, source: DatasetSource) -> CheckedJob:
    """prepare's checks with the same refusals, in memory bounded whatever the dataset's size (the service checks
    jobs this way; the runner prepares them)."""
    with _refusals():
        _, max_length = _check_spec(spec)
        dataset = summarize_dataset(source, spec.text_column, spec.label_column)
        labels = resolve_labels(dataset.label_counts, spec.labels)
        check_split(dataset.label_counts, spec.eval_fraction)
    return CheckedJob(spec, max_length, dataset, labels)


@contextmanager
def _refusals() -> Iterator[None]:
    """Any ValueError inside becomes InvalidJob (the service answers INVALID_ARGUMENT)."""
    try:
        yield
    except InvalidJob:
        raise
    except ValueError as exc:
        raise InvalidJob(str(exc)) from exc


def _check_spec(spec: FineTuneSpec) -> tuple[Path, int]:
    """The base model's directory and longest input, once the spec is valid against them."""
    model_dir = Path(spec.base_model)
    if not spec.base_model.strip():
        raise ValueError("invalid fine-tune spec: base_model must name a model directory")
    max_length = base_model_max_length(model_dir)
    spec.validate(max_length)
    return model_dir, max_length
