"""The training loop: model setup (full, LoRA, DP-SGD), epochs with evaluation, early stopping, checkpoints with
resume, cancellation, progress events and TensorBoard scalars; data-parallel (DDP) when torch.distributed is set up
(Ray Train's TorchTrainer: runner/distributed.py): each rank takes its share of every global batch, gradients are
averaged, every rank evaluates the same held-out set (so every rank decides alike), rank 0 alone writes."""

from __future__ import annotations

import io
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.training.runner.data import Batch, EncodedExamples, collate, encode, epoch_batches, poisson_batches
from services.training.runner.events import (
    Cancelled,
    CancelToken,
    CheckpointSaved,
    EvalReport,
    LogLine,
    Progress,
    ProgressSink,
    StateChanged,
)
from services.training.runner.metrics import classification_report
from services.training.runner.preflight import PreparedJob
from services.training.runner.store import ArtifactStore
from services.training.runner.tracing import phase

__all__ = [
    "BEST_WEIGHTS",
    "CHECKPOINT_PREFIX",
    "LATEST_CHECKPOINT",
    "TENSORBOARD_PREFIX",
    "TrainOutcome",
    "Trainer",
    "bf16_supported",
    "evaluate",
]

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoints/"
LATEST_CHECKPOINT = "checkpoints/latest.json"
BEST_WEIGHTS = "checkpoints/best.pt"
TENSORBOARD_PREFIX = "tensorboard/"
_CHECKPOINTS_KEPT = 2
_CHECKPOINT_FORMAT = 1
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def bf16_supported() -> bool:
    """Whether bf16 autocast runs natively here (CUDA with bf16, or a CPU with AVX512-BF16/AMX via oneDNN)."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass
class _RunState:
    """Everything besides tensors that a checkpoint restores."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    examples_seen: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TrainOutcome:
    """A trained model (possibly still wrapped by peft/opacus; export unwraps it) and what the run measured."""

    model: nn.Module
    tokenizer: Any
    encoded_eval: EncodedExamples
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    steps: int
    total_steps: int
    epochs_completed: int
    stopped_early: bool
    best_epoch: int | None
    resumed_from_step: int | None
    train_seconds: float
    examples_seen: int
    mixed_precision: str
    trainable_parameters: int
    total_parameters: int
    privacy: dict[str, Any] | None


class Trainer:
    """Trains one prepared job, checkpointing into the store and resuming from its latest checkpoint."""

    def __init__(
        self,
        job: PreparedJob,
        store: ArtifactStore,
        sink: ProgressSink,
        cancel: CancelToken,
        workdir: Path,
        progress_interval: float = 1.0,
    ) -> None:
        self.job = job
        self.spec = job.spec
        self.store = store
        self.sink = sink
        self.cancel = cancel
        self.workdir = workdir
        self.progress_interval = progress_interval
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.state = _RunState()
        self._dp: _PrivateTraining | None = None
        import torch.distributed as dist

        self._distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self._distributed else 0
        self.world_size = dist.get_world_size() if self._distributed else 1

    # ---- setup -------------------------------------------------------------------------------------------------

    def _log(self, message: str, level: str = "info") -> None:
        log.log(_LEVELS.get(level, logging.INFO), message)
        self.sink.emit(LogLine(level, message))

    def _build(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

        spec, job = self.spec, self.job
        _seed_everything(spec.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
        label2id = {label: i for i, label in enumerate(job.labels)}
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        with phase("tokenize", examples=len(job.dataset)):
            self.train_data = encode(self.tokenizer, job.dataset, job.train, label2id, spec.max_seq_length)
            self.eval_data = encode(self.tokenizer, job.dataset, job.held_out, label2id, spec.max_seq_length)

        model: nn.Module = AutoModelForSequenceClassification.from_pretrained(
            job.model_dir,
            num_labels=len(job.labels),
            id2label=dict(enumerate(job.labels)),
            label2id=label2id,
        )
        if spec.method == "lora":
            from peft import LoraConfig, TaskType, get_peft_model

            lora = spec.lora
            model = get_peft_model(
                model,
                LoraConfig(
                    task_type=TaskType.SEQ_CLS,
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules),
                ),
            )
        self.model = model.to(self.device)
        self.model.train()
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.trainable_names = [n for n, _ in trainable]
        self.trainable_parameters = sum(p.numel() for _, p in trainable)
        self.total_parameters = sum(p.numel() for p in self.model.parameters())

        # No weight decay on biases and LayerNorm weights, as BERT was pre-trained.
        decay = [p for n, p in trainable if not _no_decay(n)]
        no_decay = [p for n, p in trainable if _no_decay(n)]
        groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.learning_rate)
        if spec.privacy is None:
            self.steps_per_epoch = math.ceil(len(self.train_data) / spec.batch_size)
        else:
            # Poisson sampling at rate B/N: an epoch is N/B steps in expectation.
            self.steps_per_epoch = max(1, round(len(self.train_data) / spec.batch_size))
        self.total_steps = spec.max_steps if spec.max_steps is not None else spec.epochs * self.steps_per_epoch
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, spec.warmup_for(self.total_steps), self.total_steps
        )
        self.forward_module: nn.Module = self.model
        self.step_optimizer: torch.optim.Optimizer = self.optimizer
        if spec.privacy is not None:
            self._dp = _PrivateTraining(self)
        elif self._distributed:
            from torch.nn.parallel import DistributedDataParallel

            # Every rank starts from rank 0's weights (broadcast here) and averages gradients on backward.
            self.forward_module = DistributedDataParallel(self.model)
        self.use_bf16 = spec.mixed_precision == "bf16" and bf16_supported()
        if spec.mixed_precision == "bf16" and not self.use_bf16:
            self._log("bf16 requested but this hardware has no native bf16: training in fp32", "warning")

    def _autocast(self) -> AbstractContextManager[Any]:
        if not self.use_bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        if self.spec.method == "full":
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().cpu() for n in self.trainable_names}

    def _load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        result = self.model.load_state_dict(state, strict=self.spec.method == "full")
        missing = [n for n in self.trainable_names if n not in state]
        if result.unexpected_keys or missing:
            raise RuntimeError(
                f"checkpoint does not fit the model (unexpected {result.unexpected_keys}, missing {missing})"
            )

    def _save_checkpoint(self) -> str:
        state = self.state
        payload = {
            "format": _CHECKPOINT_FORMAT,
            "fingerprint": self.job.fingerprint,
            "model": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "run": state.to_dict(),
            "accountant": self._dp.accountant.state_dict() if self._dp else None,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        buffer.seek(0)
        name = f"{CHECKPOINT_PREFIX}step-{state.step:08d}-epoch-{state.epoch:04d}-{state.batch_in_epoch:06d}.pt"
        size = self.store.put(name, buffer)
        pointer = {"name": name, "step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch}
        self.store.put(LATEST_CHECKPOINT, json.dumps(pointer).encode())
        for old in self._checkpoint_names()[:-_CHECKPOINTS_KEPT]:
            self.store.delete(old)
        self.sink.emit(CheckpointSaved(name, state.step, state.epoch, size))
        return name

    def _checkpoint_names(self) -> list[str]:
        return [n for n in self.store.list(CHECKPOINT_PREFIX + "step-") if n.endswith(".pt")]

    def _resume(self) -> int | None:
        if not self.store.exists(LATEST_CHECKPOINT):
            return None
        pointer = json.loads(self.store.get(LATEST_CHECKPOINT))
        payload = torch.load(io.BytesIO(self.store.get(pointer["name"])), map_location="cpu", weights_only=True)
        if payload.get("format") != _CHECKPOINT_FORMAT or payload.get("fingerprint") != self.job.fingerprint:
            raise ValueError(
                "the job directory holds checkpoints of a different job (spec or dataset changed); use a new job"
            )
        self._load_trainable_state(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self._dp is not None and payload["accountant"] is not None:
            self._dp.accountant.load_state_dict(payload["accountant"])
        self.state = _RunState(**payload["run"])
        self._pending_rng = payload["rng"]
        self._log(f"resuming from {pointer['name']} at step {self.state.step}")
        return self.state.step

    # ---- the loop ----------------------------------------------------------------------------------------------

    def _plan(self, epoch: int) -> list[Sequence[int]]:
        spec = self.spec
        if self._dp is not None:
            return poisson_batches(len(self.train_data), self._dp.sample_rate, self.steps_per_epoch, spec.seed, epoch)
        return epoch_batches(len(self.train_data), spec.batch_size, spec.seed, epoch)

    def _forward(self, batch: Batch) -> torch.Tensor:
        inputs: dict[str, torch.Tensor] = {
            "input_ids": batch.input_ids.to(self.device),
            "attention_mask": batch.attention_mask.to(self.device),
        }
        if self._dp is not None:
            # Per-sample gradients need every embedding input explicit (opacus cannot expand BERT's buffers).
            length = batch.input_ids.shape[1]
            inputs["position_ids"] = torch.arange(length, device=self.device).expand(batch.size, -1)
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        with self._autocast():
            logits = self.forward_module(**inputs).logits
        return F.cross_entropy(logits.float(), batch.labels.to(self.device))

    def _train_step(self, batch: Batch, scale: float = 1.0) -> float:
        if batch.size == 0:
            # A Poisson draw can be empty: DP-SGD still takes the (noise-only) step its accounting counts.
            assert self._dp is not None
            self._dp.empty_step()
            self.scheduler.step()
            return float("nan")
        loss = self._forward(batch)
        (loss * scale if scale != 1.0 else loss).backward()
        if self._dp is None:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.spec.max_grad_norm
            )
        self.step_optimizer.step()
        self.scheduler.step()
        self.step_optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def train(self) -> TrainOutcome:
        from torch.utils.tensorboard import SummaryWriter

        with phase("load model", method=self.spec.method):
            self._build()
            resumed_from = self._resume()
        if self._dp is not None:
            self._dp.attach()
        self.sink.emit(
            StateChanged(
                "training",
                {
                    "total_steps": self.total_steps,
                    "step": self.state.step,
                    "resumed_from_step": resumed_from,
                    "train_examples": len(self.train_data),
                    "eval_examples": len(self.eval_data),
                    "trainable_parameters": self.trainable_parameters,
                    "mixed_precision": "bf16" if self.use_bf16 else "none",
                },
            )
        )
        tb_dir = self.workdir / "tensorboard"
        writer = SummaryWriter(str(tb_dir), purge_step=self.state.step if resumed_from else None)
        if resumed_from is not None:
            _restore_rng(self._pending_rng)
        try:
            self._loop(writer)
        finally:
            writer.close()
            self._upload_tensorboard(tb_dir)
        return self._finish(resumed_from)

    def _done(self) -> bool:
        return self.state.stopped_early or self.state.step >= self.total_steps

    def _loop(self, writer: Any) -> None:
        state, spec = self.state, self.spec
        window_examples, window_start, window_losses = 0, time.perf_counter(), []
        while not self._done():
            with phase("epoch", epoch=state.epoch, from_step=state.step):
                batches = self._plan(state.epoch)
                while state.batch_in_epoch < len(batches) and not self._done():
                    started = time.perf_counter()
                    if self._cancel_requested():
                        self._cancel()
                    indices = batches[state.batch_in_epoch]
                    # This rank's share of the global batch (all of it with one worker), its loss weighted so that
                    # DDP's mean of the ranks' gradients is the gradient of the global batch's mean loss. A rank
                    # with no example left in a short last batch still steps (weight 0): DDP needs every rank.
                    mine = indices[self.rank :: self.world_size]
                    scale = len(mine) * self.world_size / len(indices) if indices else 1.0
                    batch = collate(self.train_data, mine or indices[:1], self.pad_id)
                    loss = self._train_step(batch, scale if mine else 0.0)
                    state.step += 1
                    state.batch_in_epoch += 1
                    state.examples_seen += len(indices)
                    window_examples += len(indices)
                    if not math.isnan(loss):
                        window_losses.append(loss)
                    now = time.perf_counter()
                    if now - window_start >= self.progress_interval or self._done() or state.step == 1:
                        rate = window_examples / max(now - window_start, 1e-9)
                        mean_loss = sum(window_losses) / len(window_losses) if window_losses else None
                        lr = self.scheduler.get_last_lr()[0]
                        self.sink.emit(Progress(state.step, self.total_steps, state.epoch, rate, mean_loss, lr))
                        if mean_loss is not None:
                            writer.add_scalar("train/loss", mean_loss, state.step)
                        writer.add_scalar("train/learning_rate", lr, state.step)
                        writer.add_scalar("train/examples_per_second", rate, state.step)
                        window_examples, window_start, window_losses = 0, time.perf_counter(), []
                    # Throughput counts everything a step costs here (batching, events, TensorBoard); evaluations and
                    # checkpoints are their own phases.
                    state.train_seconds += time.perf_counter() - started
                    if (
                        spec.checkpoint_every_steps
                        and state.step % spec.checkpoint_every_steps == 0
                        and not self._done()
                    ):
                        self._save_checkpoint()
                if state.batch_in_epoch >= len(batches):
                    self._end_epoch(writer)
                    window_start = time.perf_counter()
        # A run that ended mid-epoch (max_steps) still gets its held-out evaluation and a final checkpoint, so a
        # restart during export does not train again.
        if not state.history or state.history[-1]["step"] != state.step:
            self._evaluate_into_history(writer, state.epoch)
            self._save_checkpoint()
            self._upload_tensorboard(self.workdir / "tensorboard", writer)

    def _end_epoch(self, writer: Any) -> None:
        state, spec = self.state, self.spec
        metrics = self._evaluate_into_history(writer, state.epoch)
        value = float(metrics[spec.early_stopping_metric])
        if state.best_metric is None or value > state.best_metric:
            state.best_metric, state.best_epoch, state.epochs_without_improvement = value, state.epoch, 0
            if spec.early_stopping_patience is not None:
                self._save_best()
        else:
            state.epochs_without_improvement += 1
            if (
                spec.early_stopping_patience is not None
                and state.epochs_without_improvement >= spec.early_stopping_patience
            ):
                state.stopped_early = True
                self._log(
                    f"early stopping after epoch {state.epoch}: {spec.early_stopping_metric} has not improved on "
                    f"{state.best_metric:.4f} (epoch {state.best_epoch}) "
                    f"for {state.epochs_without_improvement} epoch(s)"
                )
        state.epoch += 1
        state.batch_in_epoch = 0
        self._save_checkpoint()
        self._upload_tensorboard(self.workdir / "tensorboard", writer)

    def _evaluate_into_history(self, writer: Any, epoch: int) -> dict[str, Any]:
        state = self.state
        with phase("evaluate", epoch=epoch, step=state.step, examples=len(self.eval_data)) as span:
            metrics = evaluate(
                self.model, self.eval_data, self.job.labels, self.pad_id, max(self.spec.batch_size, 32), self._autocast
            )
            span.set_attribute("aidc.training.accuracy", float(metrics["accuracy"]))
        self.model.train()
        if self._dp is not None:
            metrics["epsilon"] = self._dp.epsilon()
            writer.add_scalar("privacy/epsilon", metrics["epsilon"], state.step)
        state.history.append({"epoch": epoch, "step": state.step, **metrics})
        self.sink.emit(EvalReport(epoch, state.step, metrics))
        writer.add_scalar("eval/accuracy", metrics["accuracy"], state.step)
        writer.add_scalar("eval/macro_f1", metrics["macro_f1"], state.step)
        writer.add_scalar("eval/loss", metrics["eval_loss"], state.step)
        for label, report in metrics["per_class"].items():
            writer.add_scalar(f"eval/f1/{label}", report["f1"], state.step)
        return metrics

    def _save_best(self) -> None:
        buffer = io.BytesIO()
        torch.save({"epoch": self.state.epoch, "model": self._trainable_state()}, buffer)
        buffer.seek(0)
        self.store.put(BEST_WEIGHTS, buffer)

    def _upload_tensorboard(self, tb_dir: Path, writer: Any | None = None) -> None:
        if writer is not None:
            writer.flush()
        if tb_dir.is_dir():
            for path in sorted(tb_dir.iterdir()):
                if path.is_file():
                    self.store.put(TENSORBOARD_PREFIX + path.name, path.read_bytes())

    def _cancel_requested(self) -> bool:
        """Whether to stop now; with several ranks, decided together (any rank asked: all stop at this step), so
        no rank waits forever for the others' gradients."""
        if not self._distributed:
            return self.cancel.cancelled
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.cancel.cancelled else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _cancel(self) -> None:
        name = self._save_checkpoint()
        self._log(f"cancelled at step {self.state.step}; checkpoint {name}")
        raise Cancelled(name)

    def _finish(self, resumed_from: int | None) -> TrainOutcome:
        state, spec = self.state, self.spec
        final = state.history[-1]
        if (
            spec.early_stopping_patience is not None
            and state.best_epoch is not None
            and self.store.exists(BEST_WEIGHTS)
        ):
            best = [h for h in state.history if h["epoch"] == state.best_epoch and h["step"] != final["step"]]
            if best and best[-1][spec.early_stopping_metric] > final[spec.early_stopping_metric]:
                saved = torch.load(io.BytesIO(self.store.get(BEST_WEIGHTS)), map_location="cpu", weights_only=True)
                self._load_trainable_state(saved["model"])
                final = best[-1]
                self._log(f"restored the best weights (epoch {state.best_epoch})")
        metrics = {k: v for k, v in final.items() if k not in ("epoch", "step")}
        self.model.eval()
        return TrainOutcome(
            # Unwrapped from DDP (export traces the plain model); opacus' wrapper is unwrapped by the export.
            model=self.model if self._distributed and self._dp is None else self.forward_module,
            tokenizer=self.tokenizer,
            encoded_eval=self.eval_data,
            metrics=metrics,
            history=[{k: v for k, v in h.items() if k != "per_class"} for h in state.history],
            steps=state.step,
            total_steps=self.total_steps,
            epochs_completed=state.epoch,
            stopped_early=state.stopped_early,
            best_epoch=state.best_epoch,
            resumed_from_step=resumed_from,
            train_seconds=state.train_seconds,
            examples_seen=state.examples_seen,
            mixed_precision="bf16" if self.use_bf16 else "none",
            trainable_parameters=self.trainable_parameters,
            total_parameters=self.total_parameters,
            privacy=self._dp.report() if self._dp else None,
        )


class _PrivateTraining:
    """DP-SGD with opacus: per-sample gradients, clipping and noise, and an RDP accountant of the epsilon spent."""

    def __init__(self, trainer: Trainer) -> None:
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.optimizers import DPOptimizer

        spec = trainer.spec
        settings = spec.privacy
        assert settings is not None
        self.settings = settings
        self.trainer = trainer
        self.sample_rate = min(1.0, spec.batch_size / len(trainer.train_data))
        self.noise_multiplier = float(
            get_noise_multiplier(
                target_epsilon=settings.target_epsilon,
                target_delta=settings.delta,
                sample_rate=self.sample_rate,
                steps=trainer.total_steps,
                accountant="rdp",
            )
        )
        trainer.model.train()  # opacus needs train mode before wrapping
        self.module = trainer.model
        self.grad_sample_module = GradSampleModule(trainer.model)
        self.optimizer = DPOptimizer(
            trainer.optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=spec.batch_size,
        )
        self.accountant = RDPAccountant()
        trainer.forward_module = self.grad_sample_module
        trainer.step_optimizer = self.optimizer

    def attach(self) -> None:
        # After a resume loaded the accountant's history, so epsilon keeps counting from there.
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))

    def empty_step(self) -> None:
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def epsilon(self) -> float:
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.settings.delta))

    def report(self) -> dict[str, Any]:
        return {
            "target_epsilon": self.settings.target_epsilon,
            "delta": self.settings.delta,
            "epsilon_spent": self.epsilon(),
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.settings.max_grad_norm,
            "sample_rate": self.sample_rate,
            "sampling": "poisson",
            "accountant": "rdp",
        }


def evaluate(
    model: nn.Module,
    data: EncodedExamples,
    labels: tuple[str, ...],
    pad_id: int,
    batch_size: int,
    autocast: Any = nullcontext,
) -> dict[str, Any]:
    """Held-out metrics of the model: accuracy, macro-F1, per-class report and mean cross-entropy."""
    model.eval()
    device = next(model.parameters()).device
    # Length-sorted batches pad little; the order does not change the metrics.
    order = sorted(range(len(data)), key=data.length)
    predicted: list[int] = []
    actual: list[int] = []
    loss_sum = 0.0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = collate(data, order[start : start + batch_size], pad_id)
            with autocast():
                logits = model(
                    input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
                ).logits
            logits = logits.float().cpu()
            loss_sum += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
            predicted.extend(logits.argmax(dim=-1).tolist())
            actual.extend(batch.labels.tolist())
    report = classification_report(predicted, actual, labels)
    report["eval_loss"] = loss_sum / max(len(actual), 1)
    return report


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """RNG states as plain lists and tensors, so checkpoints load with torch.load(weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
