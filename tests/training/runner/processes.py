"""The runner as the scheduler starts it (``python -m services.training.runner``, its own process), watched for its
peak memory: shared by the memory-limit test and ``tests/bench/bench_training_data.py``."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services.training.runner import RUNNER_ENV, FineTuneSpec
from services.training.runner.tiny import keyword_dataset, to_csv


def write_long_dataset(path: Path, mib: int) -> int:
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


@dataclass(frozen=True)
class RunnerRun:
    """How one runner process ended, and its peak data segment (VmData: the heap and private mappings, what
    RLIMIT_DATA counts) and resident set (VmHWM), in MiB."""

    code: int
    vm_data_mib: float
    vm_hwm_mib: float
    seconds: float
    events: list[dict[str, object]]

    def failure(self) -> dict[str, object]:
        """The detail of the run's ``failed`` state event."""
        return next(e["detail"] for e in self.events if e.get("state") == "failed")  # type: ignore[return-value]


def run_runner(work: Path, model: Path, data: Path, data_limit: int = 0, batch_size: int = 8) -> RunnerRun:
    """Trains 20 steps of ``model`` on ``data`` in a runner process; with ``data_limit`` (bytes) its data segment may
    not grow beyond it (RLIMIT_DATA, as the scheduler's launcher sets it from the job's memory request: an allocation
    past it fails). A tenth is held out, so that a 1 MiB dataset's run evaluates full batches (32 examples) too: its
    peak is then the runner's own needs, whatever the dataset."""
    spec = FineTuneSpec(
        base_model=str(model),
        epochs=1,
        max_steps=20,
        batch_size=batch_size,
        max_seq_length=32,
        eval_fraction=0.1,
        seed=7,
    )
    job_dir = work / f"job-{data.stem}-{data_limit}-{batch_size}"
    job_dir.mkdir(parents=True)
    (job_dir / "spec.json").write_text(json.dumps(spec.to_dict()))
    argv = [sys.executable, "-m", "services.training.runner", "--job-dir", str(job_dir)]
    argv += ["--spec", str(job_dir / "spec.json"), "--dataset", str(data)]
    started = time.perf_counter()
    limit = (lambda: resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))) if data_limit else None
    with (job_dir / "events.jsonl").open("wb") as out, (job_dir / "stderr").open("wb") as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err, env={**os.environ, **RUNNER_ENV}, preexec_fn=limit)
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
    events = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    return RunnerRun(process.returncode, peak["VmData"], peak["VmHWM"], time.perf_counter() - started, events)
