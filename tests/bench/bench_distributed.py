"""Benchmark of multi-worker fine-tunes on Ray: DDP scaling on this machine (1 vs 2 workers, samples/s), and the Ray
path's overhead to the first training step, each beside the one-process runner measured in the same run.

- The cluster: a real Ray cluster of two nodes (separate raylets on 127.0.0.1, one logical CPU each;
  tests/ray_support.py).
- Each side is the runner exactly as the scheduler starts it for its executor: `python -m services.training.runner`
  (local executor; one torch thread, as for a 1-core job) and `python -m services.training.runner.distributed` with
  the placement the scheduler would give it (AIDC_RAY_PLACEMENT: one 1-CPU worker, or one on each node). The same
  fine-tune everywhere: a tiny BERT on the keyword data, the same global batch, steps and seed.
- samples/s: examples trained / seconds training, from each run's result.json (rank 0's clock; the global batch).
- Time to first step: from starting the process to its first progress event (step 1 done) on stdout: what the Ray
  path adds (ray.init, the placement group, the workers, torch.distributed's rendezvous) shows as the difference.
- Rounds alternate the order of the sides, and the figures are medians (the machine is shared).

On two cores, two workers share the cores one worker had to itself, plus gloo's all-reduce of every gradient:
expect <= 1x. Run with `make bench` (or `python -m tests.bench.bench_distributed`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.scheduler.executors.ray_placement import PLACEMENT_ENV, Placement, bundle, node_id_of
from services.training.runner import RUNNER_ENV, FineTuneSpec
from services.training.runner.tiny import build_tiny_bert, keyword_dataset, to_csv
from tests.ray_support import GIB, LocalRayCluster, NodeSpec, driver_env, ray_cluster

ROUNDS = 3
EXAMPLES = 1200
BATCH = 32
SEQ = 64
OFFLINE = {**RUNNER_ENV, "OMP_NUM_THREADS": "1"}


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


def _run(module: str, job_dir: Path, root: Path, env: dict[str, str]) -> tuple[float, float]:
    """(seconds from start to the first progress event, examples/s of training) of one runner process."""
    started = time.perf_counter()
    first_step = 0.0
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            module,
            "--job-dir",
            str(job_dir),
            "--spec",
            str(root / "spec.json"),
            "--dataset",
            str(root / "data.csv"),
        ],
        env={**os.environ, **OFFLINE, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if not first_step and '"progress"' in line:
            first_step = time.perf_counter() - started
    if process.wait() != 0:
        raise RuntimeError(f"{module} exited {process.returncode}")
    result = json.loads((job_dir / "result.json").read_text())
    return first_step, float(result["training"]["examples_per_second"])


def _ray_env(cluster: LocalRayCluster, workers: int, job: str) -> dict[str, str]:
    nodes = sorted(cluster.nodes)[:workers]
    placement = Placement(bundle(1000, GIB, 0), tuple(node_id_of(n) for n in nodes))
    return {**driver_env(cluster.address), PLACEMENT_ENV: placement.to_json(), "AIDC_JOB_ID": job}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, ray_cluster([NodeSpec(1, 4 * GIB), NodeSpec(1, 4 * GIB)]) as cluster:
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
        (root / "data.csv").write_bytes(to_csv(rows))
        (root / "spec.json").write_text(json.dumps(_spec(model_dir).to_dict()))
        sides = {
            "local": ("services.training.runner", lambda job: {}),
            "ray-1": ("services.training.runner.distributed", lambda job: _ray_env(cluster, 1, job)),
            "ray-2": ("services.training.runner.distributed", lambda job: _ray_env(cluster, 2, job)),
        }
        first: dict[str, list[float]] = {name: [] for name in sides}
        rate: dict[str, list[float]] = {name: [] for name in sides}
        for round_ in range(ROUNDS):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for name in order:
                module, env = sides[name]
                job = f"{name}-{round_}"
                seconds, per_second = _run(module, root / job, root, env(job))
                first[name].append(seconds)
                rate[name].append(per_second)
            print(
                f"round {round_ + 1}: "
                + ", ".join(f"{n} {rate[n][-1]:.0f} ex/s, first step {first[n][-1]:.1f} s" for n in sides),
                flush=True,
            )
        scaling = statistics.median(b / a for a, b in zip(rate["ray-1"], rate["ray-2"], strict=True))
        vs_local = statistics.median(b / a for a, b in zip(rate["local"], rate["ray-1"], strict=True))
        overhead = statistics.median(b - a for a, b in zip(first["local"], first["ray-1"], strict=True))
        print(f"DDP fine-tune (tiny BERT h128 x2, global batch {BATCH}, seq <= {SEQ}, 1 thread per worker, gloo)")
        for name, label in (
            ("local", "local runner, 1 process"),
            ("ray-1", "Ray, 1 worker"),
            ("ray-2", "Ray, 2 workers"),
        ):
            print(
                f"  {label:24s} {statistics.median(rate[name]):7.0f} samples/s, first step after "
                f"{statistics.median(first[name]):5.1f} s (medians of {ROUNDS})"
            )
        print(f"  scaling 2 workers / 1 worker:   {scaling:.2f}x (median of the rounds' ratios; <= 1x expected here)")
        print(f"  Ray 1 worker / local runner:     {vs_local:.2f}x samples/s")
        print(f"  Ray overhead to the first step:  {overhead:+.1f} s vs the local runner (median of the rounds)")


if __name__ == "__main__":
    main()
