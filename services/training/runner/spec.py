"""What a fine-tune job asks for (FineTuneSpec), and its validation before any compute is spent."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "DEFAULT_INT8_PARITY_TOLERANCE",
    "DEFAULT_PARITY_TOLERANCE",
    "EARLY_STOPPING_METRICS",
    "FineTuneSpec",
    "LoraSettings",
    "METHODS",
    "MIXED_PRECISIONS",
    "PrivacySettings",
]

METHODS = ("full", "lora")
MIXED_PRECISIONS = ("none", "bf16")
EARLY_STOPPING_METRICS = ("accuracy", "macro_f1")
# A trace reproduces the eager model bit for bit here; the bound only absorbs freezing's constant folding.
DEFAULT_PARITY_TOLERANCE = 1e-4
# int8 is compared with the fp32 eager model, so the bound is the quantization error on logits.
DEFAULT_INT8_PARITY_TOLERANCE = 0.5


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (peft) on the attention projections; the classifier head stays fully trainable."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("query", "value")


@dataclass(frozen=True)
class PrivacySettings:
    """DP-SGD (opacus): noise is calibrated so that the whole run spends at most target_epsilon at delta."""

    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class FineTuneSpec:
    """A sequence-classification fine-tune: base model, dataset columns, labels, hyperparameters and options.

    `labels` empty means "take them from the dataset" (sorted); given, every dataset label must be one of them and
    their order fixes the class indices. `max_steps`, when set, overrides `epochs`. `parity_tolerance` None means
    the default for the export kind (fp32 or int8).
    """

    base_model: str
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] = ()
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 16
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_seq_length: int = 128
    seed: int = 0
    eval_fraction: float = 0.1
    early_stopping_patience: int | None = None
    early_stopping_metric: str = "accuracy"
    method: str = "full"
    lora: LoraSettings = field(default_factory=LoraSettings)
    mixed_precision: str = "none"
    privacy: PrivacySettings | None = None
    int8_export: bool = False
    parity_tolerance: float | None = None
    checkpoint_every_steps: int | None = None

    @property
    def effective_parity_tolerance(self) -> float:
        if self.parity_tolerance is not None:
            return self.parity_tolerance
        return DEFAULT_INT8_PARITY_TOLERANCE if self.int8_export else DEFAULT_PARITY_TOLERANCE

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps: the explicit count if given, else the ratio of the run's steps."""
        if self.warmup_steps:
            return min(self.warmup_steps, total_steps)
        return int(total_steps * self.warmup_ratio)

    def validate(self, model_max_len: int) -> None:
        """Raise ValueError naming every bad value; model_max_len is the base model's maximum sequence length."""
        problems: list[str] = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        check(bool(self.base_model.strip()), "base_model must name a model directory")
        check(bool(self.text_column), "text_column must not be empty")
        check(bool(self.label_column), "label_column must not be empty")
        check(self.text_column != self.label_column, "text_column and label_column must differ")
        check(len(set(self.labels)) == len(self.labels), f"labels must be unique (got {list(self.labels)})")
        check(not self.labels or len(self.labels) >= 2, "labels must list at least 2 classes")
        check(all(label.strip() for label in self.labels), "labels must not be blank")
        check(self.epochs >= 1, f"epochs must be >= 1 (got {self.epochs})")
        check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 (got {self.max_steps})")
        check(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        check(
            _finite(self.learning_rate) and self.learning_rate > 0,
            f"learning_rate must be > 0 (got {self.learning_rate})",
        )
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        check(
            _finite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1,
            f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio})",
        )
        check(not (self.warmup_steps and self.warmup_ratio), "give warmup_steps or warmup_ratio, not both")
        check(
            _finite(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay must be >= 0 (got {self.weight_decay})",
        )
        check(
            _finite(self.max_grad_norm) and self.max_grad_norm > 0,
            f"max_grad_norm must be > 0 (got {self.max_grad_norm})",
        )
        check(self.max_seq_length >= 2, f"max_seq_length must be >= 2 (got {self.max_seq_length})")
        check(
            self.max_seq_length <= model_max_len,
            f"max_seq_length {self.max_seq_length} is above the base model's maximum of {model_max_len}",
        )
        check(self.seed >= 0, f"seed must be >= 0 (got {self.seed})")
        check(
            _finite(self.eval_fraction) and 0 < self.eval_fraction < 1,
            f"eval_fraction must be in (0, 1) (got {self.eval_fraction})",
        )
        check(
            self.early_stopping_patience is None or self.early_stopping_patience >= 1,
            f"early_stopping_patience must be >= 1 (got {self.early_stopping_patience})",
        )
        check(
            self.early_stopping_metric in EARLY_STOPPING_METRICS,
            f"early_stopping_metric must be one of {EARLY_STOPPING_METRICS} (got {self.early_stopping_metric!r})",
        )
        check(self.method in METHODS, f"method must be one of {METHODS} (got {self.method!r})")
        if self.method == "lora":
            lora = self.lora
            check(lora.r >= 1, f"lora.r must be >= 1 (got {lora.r})")
            check(lora.alpha > 0, f"lora.alpha must be > 0 (got {lora.alpha})")
            check(
                _finite(lora.dropout) and 0 <= lora.dropout < 1, f"lora.dropout must be in [0, 1) (got {lora.dropout})"
            )
            check(bool(lora.target_modules), "lora.target_modules must name at least one module")
        check(
            self.mixed_precision in MIXED_PRECISIONS,
            f"mixed_precision must be one of {MIXED_PRECISIONS} (got {self.mixed_precision!r})",
        )
        if self.privacy is not None:
            dp = self.privacy
            check(
                _finite(dp.target_epsilon) and dp.target_epsilon > 0,
                f"privacy.target_epsilon must be > 0 (got {dp.target_epsilon})",
            )
            check(_finite(dp.delta) and 0 < dp.delta < 1, f"privacy.delta must be in (0, 1) (got {dp.delta})")
            check(
                _finite(dp.max_grad_norm) and dp.max_grad_norm > 0,
                f"privacy.max_grad_norm must be > 0 (got {dp.max_grad_norm})",
            )
            # Per-sample gradient hooks are not written for bf16 activations.
            check(self.mixed_precision == "none", "differential privacy runs in fp32: set mixed_precision to 'none'")
        check(
            self.parity_tolerance is None or (_finite(self.parity_tolerance) and self.parity_tolerance > 0),
            f"parity_tolerance must be > 0 (got {self.parity_tolerance})",
        )
        check(
            self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1,
            f"checkpoint_every_steps must be >= 1 (got {self.checkpoint_every_steps})",
        )
        if problems:
            raise ValueError("invalid fine-tune spec: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["lora"]["target_modules"] = list(self.lora.target_modules)
        return data

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON form: a checkpoint only resumes the job that wrote it."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FineTuneSpec:
        """Build from JSON-shaped data; unknown fields and wrong types raise ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError("invalid fine-tune spec: expected a JSON object")
        values = _coerce_fields(cls, data, "")
        if "lora" in data:
            values["lora"] = LoraSettings(**_coerce_fields(LoraSettings, _mapping(data["lora"], "lora"), "lora."))
        if data.get("privacy") is not None:
            values["privacy"] = PrivacySettings(
                **_coerce_fields(PrivacySettings, _mapping(data["privacy"], "privacy"), "privacy.")
            )
        if "base_model" not in values:
            raise ValueError("invalid fine-tune spec: base_model is required")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str | bytes) -> FineTuneSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid fine-tune spec: not JSON ({exc})") from exc
        return cls.from_dict(data)


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _mapping(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"invalid fine-tune spec: {name} must be an object")
    return value


# The JSON type each scalar field accepts; nested settings are handled by the caller.
_KINDS: dict[str, str] = {
    "base_model": "str",
    "text_column": "str",
    "label_column": "str",
    "labels": "str_list",
    "epochs": "int",
    "max_steps": "int?",
    "batch_size": "int",
    "learning_rate": "float",
    "warmup_steps": "int",
    "warmup_ratio": "float",
    "weight_decay": "float",
    "max_grad_norm": "float",
    "max_seq_length": "int",
    "seed": "int",
    "eval_fraction": "float",
    "early_stopping_patience": "int?",
    "early_stopping_metric": "str",
    "method": "str",
    "mixed_precision": "str",
    "int8_export": "bool",
    "parity_tolerance": "float?",
    "checkpoint_every_steps": "int?",
    "r": "int",
    "alpha": "int",
    "dropout": "float",
    "target_modules": "str_list",
    "target_epsilon": "float",
    "delta": "float",
}


def _coerce_fields(kind: type, data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    names = {f.name for f in fields(kind)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"invalid fine-tune spec: unknown field(s) {', '.join(prefix + u for u in unknown)}")
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name in ("lora", "privacy"):
            continue
        out[name] = _coerce(prefix + name, _KINDS[name], value)
    return out


def _coerce(name: str, kind: str, value: Any) -> Any:
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None and optional:
        return None
    bad = ValueError(f"invalid fine-tune spec: {name} must be {kind.replace('_', ' of ')} (got {value!r})")
    if kind == "str":
        if not isinstance(value, str):
            raise bad
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if kind == "str_list":
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise bad
        return tuple(value)
    raise AssertionError(kind)
