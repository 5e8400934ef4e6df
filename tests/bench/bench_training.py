"""Benchmark of training throughput: the runner's loop against a plain PyTorch loop on the same model, data and
batch size, in the same run (goal: runner >= 0.95x the plain loop).

Run with `make bench` (or `python -m tests.bench.bench_training`). Both sides train the same tiny BERT from the
same initial weights for the same number of steps; each round runs both back to back (alternating which goes
first) and the median of the rounds' ratios is the figure, because the machine's other load moves absolute
figures by tens of percent.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from services.training.runner import BytesSource, CancelToken, CollectingSink, FineTuneSpec, LocalArtifactStore
from services.training.runner.data import epoch_batches
from services.training.runner.preflight import prepare
from services.training.runner.tiny import build_tiny_bert, keyword_dataset, to_csv
from services.training.runner.train import Trainer

ROUNDS = 9
EXAMPLES = 1600
BATCH = 32
SEQ = 64


def _spec(model_dir: Path) -> FineTuneSpec:
    return FineTuneSpec(
        base_model=str(model_dir),
        epochs=1,
        batch_size=BATCH,
        learning_rate=1e-3,
        warmup_ratio=0.1,
        max_seq_length=SEQ,
        eval_fraction=0.05,
        seed=0,
    )


def runner_throughput(model_dir: Path, data: bytes, work: Path) -> float:
    """Examples/s of the runner's training loop (progress events, cancellation checks, TensorBoard and per-batch
    collation included; the epoch-end evaluation and checkpoint are not training and are excluded)."""
    with prepare(_spec(model_dir), BytesSource("data.csv", data), work / ".work" / "data") as job:
        out = Trainer(job, LocalArtifactStore(work), CollectingSink(), CancelToken(), work / ".work").train()
    return out.examples_seen / out.train_seconds


def plain_throughput(model_dir: Path, data: bytes) -> float:
    """The textbook loop: pre-tokenized, pre-padded batches, AdamW, linear warm-up, clipping, nothing else."""
    spec = _spec(model_dir)
    with tempfile.TemporaryDirectory() as scratch, prepare(spec, BytesSource("data.csv", data), Path(scratch)) as job:
        label2id = {label: i for i, label in enumerate(job.labels)}
        texts = [job.dataset.text(i) for i in job.train]
        labels = torch.tensor([label2id[job.dataset.label(i)] for i in job.train])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(job.labels))
    model.train()
    batches = []
    for indices in epoch_batches(len(texts), BATCH, 0, 0):
        enc = tokenizer([texts[i] for i in indices], truncation=True, max_length=SEQ, padding=True, return_tensors="pt")
        batches.append((enc["input_ids"], enc["attention_mask"], labels[list(indices)]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * len(batches)), len(batches))
    started = time.perf_counter()
    seen = 0
    for ids, mask, y in batches:
        loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seen += int(y.shape[0])
    return seen / (time.perf_counter() - started)


def main() -> None:
    # One intra-op thread on both sides: on two cores shared with other work, two OpenMP threads that wait on
    # each other swing step times by 2x and drown the comparison.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = keyword_dataset(EXAMPLES, seed=0)
        model_dir = build_tiny_bert(
            root / "model",
            [t for t, _ in rows],
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            intermediate_size=512,
            max_position_embeddings=SEQ,
        )
        data = to_csv(rows)
        runner: list[float] = []
        plain: list[float] = []
        for round_ in range(ROUNDS):
            # Alternate which side goes first so a drift in the machine's load does not favour one.
            order = ("plain", "runner") if round_ % 2 == 0 else ("runner", "plain")
            for side in order:
                if side == "plain":
                    plain.append(plain_throughput(model_dir, data))
                else:
                    runner.append(runner_throughput(model_dir, data, root / f"job-{round_}"))
            print(f"round {round_ + 1}: plain {plain[-1]:.0f} ex/s, runner {runner[-1]:.0f} ex/s", flush=True)
        p, r = statistics.median(plain), statistics.median(runner)
        # Each round's two runs are back to back, so their ratio cancels most of the load that moves both.
        ratio = statistics.median(x / y for x, y in zip(runner, plain, strict=True))
        print(f"training throughput (tiny BERT h128 x2, batch {BATCH}, seq <= {SEQ}, {torch.get_num_threads()} thread)")
        print(f"  plain PyTorch loop: {p:.0f} examples/s (median of {ROUNDS})")
        print(f"  runner:             {r:.0f} examples/s (median of {ROUNDS})")
        print(
            f"  ratio runner/plain: {ratio:.3f} (median of the rounds' ratios; goal >= 0.95: "
            f"{'met' if ratio >= 0.95 else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
