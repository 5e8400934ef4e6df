"""Fixtures of the runner tests: one tiny BERT (random init, tokenizer trained offline) per session and an easy
keyword-labelled dataset, so every test trains in about a second."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from services.training.runner import (
    BytesSource,
    CancelToken,
    CollectingSink,
    FineTuneSpec,
    LocalArtifactStore,
    run_job,
)
from services.training.runner.tiny import build_tiny_bert, keyword_dataset, to_csv

ROWS = keyword_dataset(600, seed=1)


@dataclass(frozen=True)
class TinyJob:
    """Runs jobs on the session's tiny BERT, each in its own job directory."""

    model_dir: Path
    tmp: Path

    def spec(self, **overrides: Any) -> FineTuneSpec:
        values: dict[str, Any] = {
            "base_model": str(self.model_dir),
            "epochs": 3,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "warmup_ratio": 0.1,
            "max_seq_length": 32,
            "eval_fraction": 0.2,
            "seed": 7,
        }
        values.update(overrides)
        return FineTuneSpec.from_dict(values)

    def run(
        self,
        spec: FineTuneSpec,
        name: str,
        data: bytes | None = None,
        sink: CollectingSink | None = None,
        cancel: CancelToken | None = None,
    ) -> tuple[dict[str, Any], LocalArtifactStore, CollectingSink]:
        job_dir = self.tmp / name
        store = LocalArtifactStore(job_dir)
        sink = sink or CollectingSink()
        source = BytesSource("data.csv", data if data is not None else to_csv(ROWS))
        result = run_job(spec, source, store, sink, cancel or CancelToken(), job_dir / ".work", progress_interval=0)
        return result, store, sink


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: a tiny model gains nothing from two, and on two cores shared with other test runs
    OpenMP threads that wait on each other make steps many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [text for text, _ in keyword_dataset(2000, seed=99)]
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts, max_position_embeddings=64)


@pytest.fixture
def tiny(tiny_model_dir: Path, tmp_path: Path) -> TinyJob:
    return TinyJob(tiny_model_dir, tmp_path)


@pytest.fixture
def dataset_bytes() -> Callable[[int], bytes]:
    return lambda count: to_csv(keyword_dataset(count, seed=1))
