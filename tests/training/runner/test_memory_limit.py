"""A job's memory request bounds its runner (the scheduler's launcher sets RLIMIT_DATA to it), and a dataset far
larger than the memory that leaves above the runner's own needs still trains: the runner streams its dataset to
disk and keeps an offset and a label per example, so what it holds does not grow with the dataset's bytes. Real
runner processes, as the scheduler starts them; the limit is the one tests/scheduler/test_local_executor.py shows the
launcher sets."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from services.training.runner.main import failed
from tests.training.runner.processes import run_runner, write_long_dataset

_MIB = 2**20
#: Memory the limit leaves the run above what the runner needs on a 1 MiB dataset.
_HEADROOM_MIB = 32
_DATASET_MIB = 3 * _HEADROOM_MIB


def test_a_dataset_three_times_the_memory_left_to_it_trains_and_running_out_says_so(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    small, large = tmp_path / "small.csv", tmp_path / "large.csv"
    write_long_dataset(small, 1)
    write_long_dataset(large, _DATASET_MIB)
    floor = run_runner(tmp_path, tiny_model_dir, small)
    assert floor.code == 0, floor.events
    limit = int((floor.vm_data_mib + _HEADROOM_MIB) * _MIB)
    limited = run_runner(tmp_path, tiny_model_dir, large, limit)
    assert limited.code == 0, limited.events
    assert any(e.get("state") == "succeeded" for e in limited.events)
    # The limit binds: under the same limit, batches of 1,024 examples (activations far beyond the headroom) fail,
    # and the run says it ran out of memory. (Below the runner's own needs a run fails wherever an import runs out,
    # in as many ways as there are libraries; the scheduler's launcher reports those.)
    starved = run_runner(tmp_path, tiny_model_dir, small, limit, batch_size=1024)
    assert starved.code != 0
    failure = starved.failure()
    assert failure["reason"] == "out_of_memory", failure
    assert f"limited to its memory request, {limit / _MIB:.0f} MiB" in str(failure["message"])


_SO = "/venv/lib/python3.11/site-packages/scipy/optimize/_highspy/_core.cpython-311-x86_64-linux-gnu.so"


@pytest.mark.parametrize(
    "exc",
    [
        MemoryError(),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
        # Where the limit bites in a late import decides which of glibc's loader errors it is; CI has seen both.
        ImportError(f"{_SO}: failed to map segment from shared object"),
        ImportError(f"{_SO}: cannot map zero-fill pages"),
        ImportError(f"{_SO}: cannot open shared object file: Cannot allocate memory"),
    ],
)
def test_each_form_of_running_out_of_memory_is_reported_as_such(exc: BaseException) -> None:
    assert failed(exc).detail["reason"] == "out_of_memory"


def test_a_thread_that_cannot_start_is_out_of_memory_only_under_a_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    exc = RuntimeError("can't start new thread")
    assert failed(exc).detail["reason"] == "internal"
    monkeypatch.setattr(resource, "getrlimit", lambda which: (2**30, 2**30))
    event = failed(exc)
    assert event.detail["reason"] == "out_of_memory"
    assert "limited to its memory request, 1024 MiB" in str(event.detail["message"])


def test_an_import_that_fails_for_another_reason_stays_internal() -> None:
    event = failed(ImportError(f"{_SO}: cannot open shared object file: No such file or directory"))
    assert event.detail["reason"] == "internal"
    assert "No such file or directory" in str(event.detail["message"])
