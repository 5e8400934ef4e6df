"""Benchmark of the runner's memory against its dataset's size: `python -m services.training.runner` (the process the
scheduler starts) trains 20 steps of a tiny BERT on a 1 MiB CSV and on a BENCH_DATA_MIB one (default 64), in the same
run; the figure is the peak memory the larger dataset adds, per MiB of dataset (goal: far below 1).

The dataset streams to disk (texts, then token ids) and memory holds an offset and a label per example, so what
grows with the dataset is the example count, not its bytes. The peak data segment (VmData: heap and private
mappings) is what a memory limit on the process counts; the resident set (VmHWM) also counts the token file's
pages, mapped from the page cache. Before the dataset was staged, the runner held every example: about 55 MiB of
memory per MiB of CSV (a 20 MiB dataset took the runner from 0.5 to 1.6 GB).

Run with `make bench` (or `python -m tests.bench.bench_training_data`).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.training.runner import FineTuneSpec
from services.training.runner.tiny import build_tiny_bert, keyword_dataset, to_csv

DATA_MIB = int(os.environ.get("BENCH_DATA_MIB", "64"))


def _dataset(path: Path, mib: int) -> int:
    """A CSV of keyword rows of about 2 KB of text each, ``mib`` MiB; its row count."""
    rows = keyword_dataset(4000, seed=1)
    long_rows = [(" ".join(t for t, _ in rows[i : i + 40]), rows[i][1]) for i in range(0, len(rows) - 40, 3)]
    header, body = to_csv(long_rows).split(b"\n", 1)
    count = 0
    with path.open("wb") as f:
        f.write(header + b"\n")
        while f.tell() < mib << 20:
            f.write(body)
            count += len(long_rows)
    return count


def _run(work: Path, model: Path, data: Path, data_limit: int = 0) -> dict[str, float]:
    """Peak VmData and VmHWM (MiB) of the runner on ``data``, and its wall time; with ``data_limit`` (bytes) the
    runner's data segment may not grow beyond it (RLIMIT_DATA: an allocation past it fails)."""
    spec = FineTuneSpec(
        base_model=str(model), epochs=1, max_steps=20, batch_size=8, max_seq_length=32, eval_fraction=0.01, seed=7
    )
    (work / "spec.json").write_text(json.dumps(spec.to_dict()))
    job_dir = work / f"job-{data.stem}-{data_limit}"
    argv = [sys.executable, "-m", "services.training.runner", "--job-dir", str(job_dir)]
    argv += ["--spec", str(work / "spec.json"), "--dataset", str(data)]
    started = time.perf_counter()
    limit = (lambda: resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))) if data_limit else None
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=limit)
    peak = {"VmData": 0.0, "VmHWM": 0.0}
    while process.poll() is None:
        try:
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peak:
                    peak[key] = max(peak[key], int(value.split()[0]) / 1024)
        except OSError:
            pass
        time.sleep(0.1)
    if process.returncode != 0:
        raise SystemExit(f"the runner failed on {data.name} (exit {process.returncode})")
    return {**peak, "seconds": time.perf_counter() - started}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_bert(
            work / "bert", [t for t, _ in keyword_dataset(2000, seed=99)], max_position_embeddings=64
        )
        small, large = work / "small.csv", work / "large.csv"
        _dataset(small, 1)
        rows = _dataset(large, DATA_MIB)
        mib = large.stat().st_size / 2**20
        floor, grown = _run(work, model, small), _run(work, model, large)
        # The same dataset again, the runner's data segment limited to its floor plus half the dataset's size.
        headroom = (DATA_MIB << 20) // 2
        limited = _run(work, model, large, int(floor["VmData"] * 2**20) + headroom)
    for name, figures in (("1 MiB", floor), (f"{DATA_MIB} MiB ({rows:,} rows)", grown)):
        print(
            f"runner on {name}: VmData {figures['VmData']:.1f} MiB, VmHWM {figures['VmHWM']:.1f} MiB,"
            f" {figures['seconds']:.1f} s"
        )
    print(
        f"runner on {DATA_MIB} MiB with RLIMIT_DATA at its 1 MiB peak + {headroom >> 20} MiB: trained"
        f" (VmData {limited['VmData']:.1f} MiB, {limited['seconds']:.1f} s)"
    )
    for key in ("VmData", "VmHWM"):
        extra = grown[key] - floor[key]
        print(f"{key}: +{extra:.1f} MiB for {mib - 1:.0f} MiB more dataset: {extra / (mib - 1):.3f} per dataset MiB")


if __name__ == "__main__":
    main()
