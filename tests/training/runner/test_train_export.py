"""The happy path on a tiny BERT: train -> export -> parity -> result.json, and the exported package is usable
with torch and the packaged tokenizer alone."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from transformers import AutoTokenizer

from services.training.runner import EvalReport, Progress, StateChanged
from services.training.runner.tiny import KEYWORDS, keyword_dataset
from tests.training.runner.conftest import TinyJob


def test_train_export_parity_and_result(tiny: TinyJob) -> None:
    spec = tiny.spec()
    result, store, sink = tiny.run(spec, "job")

    # Learned the keyword task (chance is 1/3).
    assert result["status"] == "succeeded"
    assert result["metrics"]["accuracy"] >= 0.9
    assert set(result["metrics"]["per_class"]) == set(KEYWORDS)
    assert all(0 <= c["f1"] <= 1 and c["support"] == 40 for c in result["metrics"]["per_class"].values())
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]
    assert (
        result["history"][-1]["accuracy"] > result["history"][0]["accuracy"] or result["history"][0]["accuracy"] >= 0.9
    )

    # Lineage-ready fields the registry will copy.
    assert result["dataset"]["sha256"] and len(result["dataset"]["sha256"]) == 64
    assert result["dataset"]["train_examples"] == 480 and result["dataset"]["eval_examples"] == 120
    assert result["spec"]["learning_rate"] == spec.learning_rate and result["base_model"]["path"] == spec.base_model
    assert result["labels"] == ["negative", "neutral", "positive"]
    assert result["training"]["steps"] == result["training"]["total_steps"] == 3 * 60
    assert result["training"]["examples_per_second"] > 0 and result["wall_seconds"] > 0
    assert result["privacy"] is None and result["environment"]["torch"] == torch.__version__

    # Parity was checked on held-out batches and passed.
    parity = result["export"]["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= spec.effective_parity_tolerance and parity["examples"] > 8
    assert result["export"]["quantization"] == "none"

    # Artifacts listed with their sizes and match what is stored.
    listed = {a["name"]: a for a in result["artifacts"]}
    for name in (
        "export/model.pt",
        "export/model_config.json",
        "export/labels.json",
        "export/tokenizer/tokenizer.json",
    ):
        assert listed[name]["size_bytes"] == store.size(name) > 0
        assert len(listed[name]["sha256"]) == 64
    assert any(n.startswith("checkpoints/step-") for n in listed)
    assert result["export"]["size_bytes"] == sum(a["size_bytes"] for n, a in listed.items() if n.startswith("export/"))
    assert json.loads(store.get("result.json")) == result

    # Events arrived in order: preparing, training, progress with a climbing step, evals, exporting, succeeded.
    states = [e.state for e in sink.events if isinstance(e, StateChanged)]
    assert states == ["preparing", "training", "exporting", "checked_parity", "succeeded"]
    steps = [e.step for e in sink.events if isinstance(e, Progress)]
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == 180
    assert len([e for e in sink.events if isinstance(e, EvalReport)]) == 3


def test_exported_package_serves_with_torch_and_its_tokenizer(tiny: TinyJob) -> None:
    result, store, _ = tiny.run(tiny.spec(), "job")
    export_dir = Path(store.root) / "export"
    config = json.loads(store.get("export/model_config.json"))
    assert [i["name"] for i in config["inputs"]] == ["input_ids", "attention_mask"]
    assert config["outputs"][0]["shape"] == [-1, 3] and config["max_sequence_length"] == 32
    assert config["labels"] == json.loads(store.get("export/labels.json")) == result["labels"]

    model = torch.jit.load(io.BytesIO(store.get("export/model.pt")))
    tokenizer = AutoTokenizer.from_pretrained(export_dir / "tokenizer")
    rows = keyword_dataset(60, seed=123)  # sentences the run never saw
    batch = tokenizer(
        [text for text, _ in rows],
        padding="max_length",
        truncation=True,
        max_length=config["max_sequence_length"],
        return_tensors="pt",
    )
    with torch.inference_mode():
        logits = model(batch["input_ids"], batch["attention_mask"])
    predicted = [config["labels"][i] for i in logits.argmax(dim=-1).tolist()]
    accuracy = sum(p == label for p, (_, label) in zip(predicted, rows, strict=True)) / len(rows)
    # As good as the runner's own evaluation said: the packaged tokenizer and labels fit the model.
    assert accuracy >= result["metrics"]["accuracy"] - 0.1 and accuracy > 0.6


def test_metrics_are_written_as_tensorboard_event_files(tiny: TinyJob) -> None:
    _, store, _ = tiny.run(tiny.spec(epochs=2), "job")
    files = store.list("tensorboard/")
    assert files and all("events.out.tfevents" in f for f in files)
    scalars: dict[str, list[tuple[int, float]]] = {}
    for name in files:
        for event in EventFileLoader(str(Path(store.root) / name)).Load():
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    assert [step for step, _ in scalars["eval/accuracy"]] == [60, 120]
    assert {"train/loss", "train/learning_rate", "eval/macro_f1", "eval/loss", "eval/f1/positive"} <= set(scalars)
    assert max(step for step, _ in scalars["train/loss"]) == 120
