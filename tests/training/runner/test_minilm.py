"""The real base model: MiniLM-L6 (22.7M parameters, shipped in a PyPI package) fine-tuned on a slice of the BBC News
topics, exported to TorchScript, parity-checked, and well above chance after a short run. The README's full figures
(0.766 on the tweets in 300 steps, 0.973 on BBC topics in 150) are scripts/finetune_minilm.py's: about 10 minutes a
task on two cores, too long for the suite; this run holds the claim that the runner really fine-tunes MiniLM."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from services.training.runner import BytesSource, CancelToken, CollectingSink, FineTuneSpec, LocalArtifactStore, run_job
from services.training.runner.offline import bbc_rows, minilm_path, rows_to_csv
from services.training.runner.preflight import base_model_max_length


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_minilm_fine_tunes_well_above_chance_exports_and_passes_parity(tmp_path: Path) -> None:
    assert base_model_max_length(minilm_path()) == 512
    rows = bbc_rows(limit=300, seed=0)
    labels = tuple(sorted({label for _, label in rows}))
    assert len(labels) == 5  # chance is 0.2
    spec = FineTuneSpec(
        base_model=str(minilm_path()),
        labels=labels,
        max_steps=30,
        batch_size=16,
        learning_rate=2e-4,
        warmup_ratio=0.1,
        max_seq_length=64,
        eval_fraction=0.2,
        seed=0,
    )
    store = LocalArtifactStore(tmp_path / "job")
    source = BytesSource("bbc.csv", rows_to_csv(rows))
    result = run_job(spec, source, store, CollectingSink(), CancelToken(), tmp_path / "job" / ".work")

    assert result["training"]["steps"] == 30 and result["training"]["total_parameters"] > 22_000_000
    # 61 held-out articles; 30 steps reached 0.92 here (the full 150-step run, 0.973).
    assert result["dataset"]["eval_examples"] == 61 and result["metrics"]["accuracy"] >= 0.8
    parity = result["export"]["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4 and parity["examples"] >= 16
    assert result["export"]["model_bytes"] > 80_000_000
    model = torch.jit.load(io.BytesIO(store.get("export/model.pt")))
    ids = torch.tensor([[101, 7592, 2088, 102]])
    assert model(ids, torch.ones_like(ids)).shape == (1, 5)
