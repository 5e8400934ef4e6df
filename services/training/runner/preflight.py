"""Everything that can reject a fine-tune job before compute is spent: the spec against the base model's limits,
the dataset's columns and labels, the split. Imports neither torch nor transformers, so the service can call it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from services.training.runner.data import (
    DatasetSource,
    LoadedDataset,
    TextExample,
    load_dataset,
    resolve_labels,
    split_examples,
)
from services.training.runner.spec import FineTuneSpec

__all__ = ["InvalidJob", "PreparedJob", "base_model_max_length", "prepare"]


class InvalidJob(ValueError):
    """The spec, base model or dataset cannot make a job (the service answers INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class PreparedJob:
    """A job that passed every check that needs no model weights: the spec, the data, the classes."""

    spec: FineTuneSpec
    model_dir: Path
    model_max_length: int
    dataset: LoadedDataset
    labels: tuple[str, ...]
    train_examples: tuple[TextExample, ...]
    eval_examples: tuple[TextExample, ...]

    @property
    def fingerprint(self) -> str:
        """Identifies the job (spec + data): checkpoints of another job are never resumed."""
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


def prepare(spec: FineTuneSpec, source: DatasetSource) -> PreparedJob:
    """Every check that can reject a job before compute is spent; InvalidJob (a ValueError) names what is wrong."""
    try:
        return _prepare(spec, source)
    except InvalidJob:
        raise
    except ValueError as exc:
        raise InvalidJob(str(exc)) from exc


def _prepare(spec: FineTuneSpec, source: DatasetSource) -> PreparedJob:
    model_dir = Path(spec.base_model)
    if not spec.base_model.strip():
        raise ValueError("invalid fine-tune spec: base_model must name a model directory")
    max_length = base_model_max_length(model_dir)
    spec.validate(max_length)
    dataset = load_dataset(source, spec.text_column, spec.label_column)
    labels = resolve_labels(dataset.examples, spec.labels)
    train, held_out = split_examples(dataset.examples, spec.eval_fraction, spec.seed)
    return PreparedJob(spec, model_dir, max_length, dataset, labels, tuple(train), tuple(held_out))
