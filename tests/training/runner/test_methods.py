"""LoRA, DP-SGD (LoRA + opacus), int8 export and bf16 each produce a model that exports and passes parity;
a model outside its tolerance fails the job with a result that says so."""

from __future__ import annotations

import io
import json

import pytest
import torch

from services.training.runner import LocalArtifactStore, ParityError
from services.training.runner.spec import DEFAULT_INT8_PARITY_TOLERANCE
from services.training.runner.train import bf16_supported
from tests.training.runner.conftest import TinyJob


def _exported_parameter_names(store_bytes: bytes) -> list[str]:
    model = torch.jit.load(io.BytesIO(store_bytes))
    return [name for name, _ in model.named_parameters()] + list(model.state_dict())


def test_lora_trains_adapters_only_and_exports_merged(tiny: TinyJob) -> None:
    result, store, _ = tiny.run(
        tiny.spec(method="lora", epochs=2, lora={"r": 4, "target_modules": ["query", "value"]}), "lora"
    )
    training = result["training"]
    assert training["method"] == "lora"
    assert 0 < training["trainable_parameters"] < training["total_parameters"] / 4
    parity = result["export"]["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= parity["tolerance"]
    # Merged before tracing: the TorchScript module carries no adapter weights.
    assert not [n for n in _exported_parameter_names(store.get("export/model.pt")) if "lora" in n]
    # Checkpoints hold the adapters and head only, not the frozen base.
    checkpoint = torch.load(io.BytesIO(store.get(store.list("checkpoints/step-")[-1])), weights_only=True)
    assert checkpoint["model"] and all("lora_" in k or "classifier" in k for k in checkpoint["model"])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dp_records_epsilon_within_target_and_exports(tiny: TinyJob, method: str) -> None:
    """LoRA + opacus is the practical combination on CPU; full-model DP-SGD needs explicit position and token type
    ids for BERT's embeddings, which the runner passes."""
    spec = tiny.spec(
        method=method,
        epochs=2,
        privacy={"target_epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0},
    )
    result, _, _ = tiny.run(spec, "dp")
    privacy = result["privacy"]
    assert 0 < privacy["epsilon_spent"] <= 4.0
    assert privacy["epsilon_spent"] > 2.0  # the noise was calibrated to the target, not far below it
    assert privacy["noise_multiplier"] > 0 and privacy["sample_rate"] == pytest.approx(8 / 480)
    assert result["history"][-1]["epsilon"] == pytest.approx(privacy["epsilon_spent"])
    assert result["training"]["method"] == method and result["training"]["steps"] == 120
    parity = result["export"]["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4


def test_int8_export_is_quantized_and_within_its_tolerance(tiny: TinyJob) -> None:
    fp32, fp32_store, _ = tiny.run(tiny.spec(epochs=2), "fp32")
    int8, int8_store, _ = tiny.run(tiny.spec(epochs=2, int8_export=True), "int8")
    parity = int8["export"]["parity"]
    assert int8["export"]["quantization"] == "int8-dynamic"
    assert parity["passed"] and parity["tolerance"] == DEFAULT_INT8_PARITY_TOLERANCE
    # Really quantized: differs from the fp32 model (the trace itself stays exact) and is smaller.
    assert 0 < parity["max_abs_diff"] <= DEFAULT_INT8_PARITY_TOLERANCE
    assert parity["trace_max_abs_diff"] <= 1e-4 and parity["argmax_agreement"] >= 0.9
    assert int8_store.size("export/model.pt") < fp32_store.size("export/model.pt")
    assert fp32["export"]["parity"]["max_abs_diff"] <= 1e-4


def test_parity_failure_fails_the_job_and_publishes_no_model(tiny: TinyJob) -> None:
    with pytest.raises(ParityError) as caught:
        tiny.run(tiny.spec(epochs=1, int8_export=True, parity_tolerance=1e-9), "strict")
    assert caught.value.report.max_abs_diff > 1e-9 and not caught.value.report.passed
    job = LocalArtifactStore(tiny.tmp / "strict")
    result = json.loads(job.get("result.json"))
    assert result["status"] == "parity_failed" and not result["export"]["parity"]["passed"]
    assert not job.exists("export/model.pt")


def test_bf16_runs_with_autocast_only_where_supported(tiny: TinyJob) -> None:
    result, _, _ = tiny.run(tiny.spec(epochs=1, mixed_precision="bf16"), "bf16")
    assert result["training"]["mixed_precision"] == ("bf16" if bf16_supported() else "none")
    assert result["export"]["parity"]["passed"]
