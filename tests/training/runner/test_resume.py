"""Checkpoints and resume: a cancelled run and a SIGKILLed runner process both continue from their checkpoint (the
step counter goes on from it) and finish with the metrics of an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from services.training.runner import Cancelled, CancelToken, CollectingSink, Progress, RunnerEvent, StateChanged
from services.training.runner.tiny import keyword_dataset, to_csv
from tests.training.runner.conftest import TinyJob

ROOT = Path(__file__).resolve().parents[3]


class CancelAtStep(CollectingSink):
    """Sets the cancel token when progress reaches a step, as CancelJob would."""

    def __init__(self, token: CancelToken, step: int) -> None:
        super().__init__()
        self.token, self.step = token, step

    def emit(self, event: RunnerEvent) -> None:
        super().emit(event)
        if isinstance(event, Progress) and event.step >= self.step:
            self.token.cancel()


def _training_detail(events: list[RunnerEvent]) -> dict[str, Any]:
    return next(e.detail for e in events if isinstance(e, StateChanged) and e.state == "training")


def test_cancelled_run_checkpoints_and_resumes_to_the_uninterrupted_result(tiny: TinyJob) -> None:
    spec = tiny.spec()  # 3 epochs of 60 steps
    reference, _, _ = tiny.run(spec, "reference")

    token = CancelToken()
    with pytest.raises(Cancelled) as caught:
        tiny.run(spec, "job", sink=CancelAtStep(token, 90), cancel=token)
    assert caught.value.checkpoint is not None and "step-00000090" in caught.value.checkpoint

    result, _, sink = tiny.run(spec, "job")
    assert _training_detail(sink.events)["resumed_from_step"] == 90
    assert [e.step for e in sink.events if isinstance(e, Progress)][0] == 91
    assert result["training"]["resumed_from_step"] == 90 and result["training"]["steps"] == 180
    # The restored optimizer, scheduler, RNG and data order make the resumed run the uninterrupted one.
    assert result["metrics"]["accuracy"] == pytest.approx(reference["metrics"]["accuracy"], abs=0.02)
    assert result["metrics"]["eval_loss"] == pytest.approx(reference["metrics"]["eval_loss"], rel=1e-3)
    assert [h["step"] for h in result["history"]] == [60, 120, 180]


def test_early_stopping_stops_on_a_plateau_and_keeps_the_best_weights(tiny: TinyJob) -> None:
    # A learning rate too small to move the metric: no improvement after the first epoch.
    result, store, _ = tiny.run(tiny.spec(epochs=6, learning_rate=1e-7, early_stopping_patience=2), "early")
    training = result["training"]
    assert training["stopped_early"] and training["epochs_completed"] == 3 and training["steps"] == 180
    assert training["best_epoch"] == 0
    assert result["metrics"]["accuracy"] == result["history"][0]["accuracy"]
    assert store.exists("checkpoints/best.pt")


def _start(job_dir: Path, spec: Path, data: Path, stderr: IO[bytes]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "services.training.runner", "--job-dir", str(job_dir), "--spec", str(spec)]
    command += ["--dataset", str(data), "--progress-interval", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the in-process reference run (see conftest)
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)


def _read_until(process: subprocess.Popen[str], stop: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    assert process.stdout is not None
    events = []
    for line in process.stdout:
        events.append(json.loads(line))
        if stop(events[-1]):
            return events
    raise AssertionError(f"runner ended (exit {process.wait()}) before the awaited event; got {events[-3:]}")


def _rest(process: subprocess.Popen[str]) -> list[dict[str, Any]]:
    assert process.stdout is not None
    return [json.loads(line) for line in process.stdout]


@pytest.mark.timeout(180)
def test_killed_runner_process_resumes_from_its_checkpoint(tiny: TinyJob) -> None:
    rows = keyword_dataset(1200, seed=4)
    spec = tiny.spec(epochs=3, batch_size=8, learning_rate=3e-3)  # 120 steps an epoch
    (tiny.tmp / "spec.json").write_text(json.dumps(spec.to_dict()))
    (tiny.tmp / "data.csv").write_bytes(to_csv(rows))
    job_dir = tiny.tmp / "job"
    reference, _, _ = tiny.run(spec, "reference", data=to_csv(rows))
    stderr = (tiny.tmp / "stderr.log").open("wb")

    # 1. SIGKILL right after the first checkpoint: no chance to clean up.
    first = _start(job_dir, tiny.tmp / "spec.json", tiny.tmp / "data.csv", stderr)
    _read_until(first, lambda e: e["event"] == "checkpoint")
    first.send_signal(signal.SIGKILL)
    killed_events = _rest(first)
    assert first.wait() == -signal.SIGKILL
    assert not (job_dir / "result.json").exists(), "the runner finished before it was killed: enlarge the data"
    checkpointed = {e["step"] for e in killed_events if e["event"] == "checkpoint"} | {120}

    # 2. Restarted: continues from the checkpoint; then SIGTERM stops it cleanly with a new checkpoint.
    second = _start(job_dir, tiny.tmp / "spec.json", tiny.tmp / "data.csv", stderr)
    training = _read_until(second, lambda e: e["event"] == "state" and e["state"] == "training")[-1]
    resumed = training["detail"]["resumed_from_step"]
    assert resumed in checkpointed and 0 < resumed < 360
    progress = _read_until(second, lambda e: e["event"] == "progress")[-1]
    assert progress["step"] == resumed + 1
    second.send_signal(signal.SIGTERM)
    tail = _rest(second)
    assert second.wait() == 130
    assert tail[-1]["event"] == "state" and tail[-1]["state"] == "cancelled"
    cancelled_at = json.loads((job_dir / "checkpoints" / "latest.json").read_text())["step"]
    assert tail[-1]["detail"]["checkpoint"].startswith(f"checkpoints/step-{cancelled_at:08d}")
    assert resumed < cancelled_at < 360

    # 3. Restarted again: finishes from there, with the uninterrupted run's metrics.
    third = _start(job_dir, tiny.tmp / "spec.json", tiny.tmp / "data.csv", stderr)
    events = _rest(third)
    assert third.wait() == 0, events[-3:]
    assert events[-1] == {**events[-1], "event": "state", "state": "succeeded"}
    result = json.loads((job_dir / "result.json").read_text())
    assert result["training"]["resumed_from_step"] == cancelled_at and result["training"]["steps"] == 360
    assert abs(result["metrics"]["accuracy"] - reference["metrics"]["accuracy"]) <= 0.05
    assert result["metrics"]["eval_loss"] == pytest.approx(reference["metrics"]["eval_loss"], rel=0.05)
    assert result["export"]["parity"]["passed"]
    stderr.close()
    assert os.path.getsize(tiny.tmp / "stderr.log") > 0  # logs go to stderr, never into the event stream
