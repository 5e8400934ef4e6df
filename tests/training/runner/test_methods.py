"""LoRA, DP-SGD (LoRA + opacus), int8 export and bf16 each produce a model that exports and passes parity;
a model outside its tolerance fails the job with a result that says so."""

from __future__ import annotations

import io
import json

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.optimizers import DPOptimizer

from services.training.runner import CollectingSink, LocalArtifactStore, ParityError
from services.training.runner import train as train_module
from services.training.runner.events import LogLine
from services.training.runner.spec import DEFAULT_INT8_PARITY_TOLERANCE
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


class NoiseSpy:
    """Watches opacus' real DPOptimizer add its noise (a spy: the step runs unchanged): per step, the noise is what
    the noised gradient differs by from the clipped, summed per-sample gradients it started from."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps = 0
        self.noise: list[torch.Tensor] = []
        original = DPOptimizer.add_noise

        def add_noise(optimizer: DPOptimizer) -> None:
            clipped = [p.summed_grad.detach().clone() for p in optimizer.params]
            original(optimizer)
            self.steps += 1
            self.noise.extend(
                (p.grad.detach() - c.view_as(p)).flatten() for p, c in zip(optimizer.params, clipped, strict=True)
            )

        monkeypatch.setattr(DPOptimizer, "add_noise", add_noise)

    def std(self) -> float:
        return float(torch.cat(self.noise).std())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dp_spends_the_epsilon_it_records_and_really_adds_noise(
    tiny: TinyJob, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoRA + opacus is the practical combination on CPU; full-model DP-SGD needs explicit position and token type
    ids for BERT's embeddings, which the runner passes."""
    spy = NoiseSpy(monkeypatch)
    spec = tiny.spec(
        method=method,
        epochs=2,
        privacy={"target_epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0},
    )
    result, _, _ = tiny.run(spec, "dp")
    privacy = result["privacy"]
    steps = result["training"]["steps"]
    assert result["training"]["method"] == method and steps == 120
    assert privacy["sample_rate"] == pytest.approx(8 / 480) and privacy["noise_multiplier"] > 0
    assert result["history"][-1]["epsilon"] == pytest.approx(privacy["epsilon_spent"])
    # The epsilon recomputed from what the run recorded (noise multiplier, sample rate, steps, delta), not from the
    # runner's accountant: every step was accounted, and the noise was calibrated to spend the target, not less.
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(
        q=privacy["sample_rate"], noise_multiplier=privacy["noise_multiplier"], steps=steps, orders=orders
    )
    epsilon, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=privacy["delta"])
    assert privacy["epsilon_spent"] == pytest.approx(epsilon, rel=1e-9)
    assert 4.0 - 0.05 <= epsilon <= 4.0
    # Another accountant (PRV, numerically tighter than RDP's bound) agrees the run stayed within its target.
    prv = PRVAccountant()
    prv.history = [(privacy["noise_multiplier"], privacy["sample_rate"], steps)]
    assert 0 < prv.get_epsilon(delta=privacy["delta"]) <= 4.0
    # The noise was applied at every step (empty Poisson batches included), Gaussian with the recorded scale:
    # std = noise_multiplier x max_grad_norm on the summed gradient.
    assert spy.steps == steps
    assert spy.std() == pytest.approx(privacy["noise_multiplier"] * privacy["max_grad_norm"], rel=0.05)
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


def test_bf16_trains_under_autocast_and_falls_back_to_fp32_without_native_support(
    tiny: TinyJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both sides of the hardware check, on any machine: bf16_supported() is replaced by a fixed answer (a fake of the
    hardware probe, since one machine has one answer; CPU autocast to bf16 runs without native bf16, only slower).
    Said yes, the run trains under bf16 autocast: its numbers differ from the fp32 run's with the same seed, it still
    learns, and the exported fp32 TorchScript passes parity. Said no, it warns and is the fp32 run exactly."""
    fp32, _, _ = tiny.run(tiny.spec(epochs=3), "fp32")

    monkeypatch.setattr(train_module, "bf16_supported", lambda: True)
    bf16, _, _ = tiny.run(tiny.spec(epochs=3, mixed_precision="bf16"), "bf16")
    assert bf16["training"]["mixed_precision"] == "bf16"
    assert bf16["history"][-1]["eval_loss"] != fp32["history"][-1]["eval_loss"]  # autocast really ran
    assert bf16["metrics"]["accuracy"] >= 0.8  # chance is 1/3; fp32 reaches 1.0 on this easy data
    assert bf16["export"]["parity"]["passed"]

    monkeypatch.setattr(train_module, "bf16_supported", lambda: False)
    sink = CollectingSink()
    fallback, _, _ = tiny.run(tiny.spec(epochs=3, mixed_precision="bf16"), "fallback", sink=sink)
    assert fallback["training"]["mixed_precision"] == "none"
    warnings = [e.message for e in sink.events if isinstance(e, LogLine) and e.level == "warning"]
    assert any("no native bf16" in w for w in warnings), warnings
    assert fallback["history"] == fp32["history"]
