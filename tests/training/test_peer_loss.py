"""A rank whose peer dies mid-collective reports the loss of a worker, not a failure of the job: two real gloo
processes on loopback, one exits between all-reduces, and the error the other gets is classified as a lost peer (so
the distributed runner exits EXIT_WORKER_LOST and the scheduler asks Ray whether a node died). Errors of the job
itself stay failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.training.runner.distributed import _peer_lost
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.timeout(180)

_RANK = """
import json, os, sys, time
import torch, torch.distributed as dist
from services.training.runner.distributed import _peer_lost
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
tensor = torch.ones(1000)
dist.all_reduce(tensor)
if rank == 1:
    os._exit(0)  # gone without a word, as with its node
try:
    for _ in range(6000):
        dist.all_reduce(tensor)
        time.sleep(0.01)
    print(json.dumps({"error": None}))
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "lost": _peer_lost(exc), "message": str(exc)[:300]}))
"""


def test_a_peer_that_dies_mid_training_is_a_lost_worker_not_a_failed_job() -> None:
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ranks = [
        subprocess.Popen([sys.executable, "-c", _RANK, str(rank), port], env=env, stdout=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=150)[0] for process in ranks]
    result = json.loads(outputs[0].strip().splitlines()[-1])
    assert result["error"] is not None and result["lost"], result


@pytest.mark.parametrize(
    "error",
    [RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("bad label"), MemoryError()],
)
def test_the_jobs_own_errors_are_failures(error: BaseException) -> None:
    assert not _peer_lost(error)
