"""The runner's command line: exit codes and the JSON-lines event stream on stdout."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from services.training.runner.main import EXIT_INVALID, EXIT_OK, EXIT_PARITY, main
from services.training.runner.tiny import keyword_dataset, to_csv
from tests.training.runner.conftest import TinyJob


def _run(tiny: TinyJob, spec: dict[str, Any] | None, job: str = "job") -> tuple[int, list[dict[str, Any]]]:
    spec_path = tiny.tmp / "spec.json"
    if spec is not None:
        spec_path.write_text(json.dumps(spec))
    data = tiny.tmp / "data.csv"
    data.write_bytes(to_csv(keyword_dataset(300, seed=1)))
    out = io.StringIO()
    code = main(["--job-dir", str(tiny.tmp / job), "--spec", str(spec_path), "--dataset", str(data)], stdout=out)
    return code, [json.loads(line) for line in out.getvalue().splitlines()]


def test_success_exit_0_and_every_stdout_line_is_an_event(tiny: TinyJob) -> None:
    code, events = _run(tiny, tiny.spec(epochs=1).to_dict())
    assert code == EXIT_OK
    kinds = {e["event"] for e in events}
    assert {"state", "progress", "eval", "checkpoint"} <= kinds <= {"state", "progress", "eval", "checkpoint", "log"}
    assert all(isinstance(e["time"], float) for e in events)
    assert events[-1]["state"] == "succeeded" and (tiny.tmp / "job" / "result.json").is_file()

    # Run again on the finished job: nothing is trained again, the result stays.
    before = (tiny.tmp / "job" / "result.json").read_bytes()
    code, events = _run(tiny, None)
    assert code == EXIT_OK
    assert [e["state"] for e in events if e["event"] == "state"] == ["preparing", "succeeded"]
    assert (tiny.tmp / "job" / "result.json").read_bytes() == before


def test_bad_spec_exits_2_with_the_reason(tiny: TinyJob) -> None:
    code, events = _run(tiny, tiny.spec(learning_rate=1e-3).to_dict() | {"learning_rate": -1.0})
    assert code == EXIT_INVALID
    assert events[-1]["state"] == "failed" and events[-1]["detail"]["reason"] == "invalid_argument"
    assert "learning_rate must be > 0" in events[-1]["detail"]["message"]
    assert not Path(tiny.tmp / "job" / "checkpoints").exists()


def test_unreadable_spec_exits_2(tiny: TinyJob) -> None:
    (tiny.tmp / "spec.json").write_text("{not json")
    code, events = _run(tiny, None)
    assert code == EXIT_INVALID and "not JSON" in events[-1]["detail"]["message"]


def test_parity_failure_exits_3(tiny: TinyJob) -> None:
    code, events = _run(tiny, tiny.spec(epochs=1, int8_export=True, parity_tolerance=1e-9).to_dict())
    assert code == EXIT_PARITY
    assert events[-1]["detail"]["reason"] == "parity"
    assert json.loads((tiny.tmp / "job" / "result.json").read_text())["status"] == "parity_failed"
