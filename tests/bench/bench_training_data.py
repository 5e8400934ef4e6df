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

import os
import tempfile
from pathlib import Path

from services.training.runner.tiny import build_tiny_bert, keyword_dataset
from tests.training.runner.processes import RunnerRun, run_runner, write_long_dataset

DATA_MIB = int(os.environ.get("BENCH_DATA_MIB", "64"))


def _checked(run: RunnerRun, name: str) -> RunnerRun:
    if run.code != 0:
        raise SystemExit(f"the runner failed on {name} (exit {run.code})")
    return run


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_bert(
            work / "bert", [t for t, _ in keyword_dataset(2000, seed=99)], max_position_embeddings=64
        )
        small, large = work / "small.csv", work / "large.csv"
        write_long_dataset(small, 1)
        rows = write_long_dataset(large, DATA_MIB)
        mib = large.stat().st_size / 2**20
        floor = _checked(run_runner(work, model, small), "1 MiB")
        grown = _checked(run_runner(work, model, large), f"{DATA_MIB} MiB")
        # The same dataset again, the runner's data segment limited to its floor plus half the dataset's size.
        headroom = (DATA_MIB << 20) // 2
        limited = _checked(run_runner(work, model, large, int(floor.vm_data_mib * 2**20) + headroom), "limited")
    for name, run in (("1 MiB", floor), (f"{DATA_MIB} MiB ({rows:,} rows)", grown)):
        print(
            f"runner on {name}: VmData {run.vm_data_mib:.1f} MiB, VmHWM {run.vm_hwm_mib:.1f} MiB, {run.seconds:.1f} s"
        )
    print(
        f"runner on {DATA_MIB} MiB with RLIMIT_DATA at its 1 MiB peak + {headroom >> 20} MiB: trained"
        f" (VmData {limited.vm_data_mib:.1f} MiB, {limited.seconds:.1f} s)"
    )
    for key, extra in (
        ("VmData", grown.vm_data_mib - floor.vm_data_mib),
        ("VmHWM", grown.vm_hwm_mib - floor.vm_hwm_mib),
    ):
        print(f"{key}: +{extra:.1f} MiB for {mib - 1:.0f} MiB more dataset: {extra / (mib - 1):.3f} per dataset MiB")


if __name__ == "__main__":
    main()
