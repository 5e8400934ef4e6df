"""Every queued job has a reason and a queue position, also those a cycle's scan did not reach."""

from __future__ import annotations

from services.scheduler.core import Node, Quota
from tests.scheduler.policy import POOL, cpu, cycle, job, make_scheduler, submit


def test_jobs_beyond_the_scan_wait_behind_the_others() -> None:
    sched = make_scheduler([Node("n1", POOL, cpu(2, 8))], [Quota("a", POOL, cpu(64, 64))], lookahead=3)
    submit(sched, *[job(f"j{i}", "a", cpu(2)) for i in range(10)])
    assert sched.reason("j0") == "waiting for the next scheduling cycle"
    result = cycle(sched)
    assert [a.job_id for a in result.admitted] == ["j0"]
    # The scan looked at 3 more, then stopped: those have their own reason, the rest wait behind them.
    assert sorted(result.reasons) == ["j1", "j2", "j3"]
    assert sched.reason("j1") == "waiting for capacity: no READY node in pool p has 2 cpu, 0 GiB free"
    assert sched.reason("j9") == "waiting behind 8 earlier or higher-priority jobs of tenant a in pool p"
    assert [sched.queue_position(f"j{i}") for i in range(1, 10)] == list(range(9))
    assert sched.queue_position("j0") is None and sched.reason("j0") == ""
    # A new higher-priority job goes to the front and is looked at first.
    submit(sched, job("urgent", "a", cpu(2), priority=10))
    assert sched.queue_position("urgent") == 0 and sched.queue_position("j1") == 1
    assert sched.release("j0")
    assert [a.job_id for a in cycle(sched).admitted] == ["urgent"]


def test_each_job_gets_its_own_reason_when_a_larger_one_fails_fast() -> None:
    """Regression: a job at least as large as one that already failed in the cycle was given that job's reason
    (another gang size, other resources)."""
    sched = make_scheduler([Node(f"n{i}", POOL, cpu(4, 16)) for i in range(4)], [Quota("a", POOL, cpu(64, 64))])
    submit(sched, job("filler", "a", cpu(4)))
    cycle(sched)
    submit(sched, job("gang3", "a", cpu(4, 2), workers=4), job("gang4", "a", cpu(4, 4), workers=4))
    result = cycle(sched)
    assert "4 cpu, 2 GiB" in result.reasons["gang3"] and "4 cpu, 4 GiB" in result.reasons["gang4"]
    assert result.reasons["gang4"].endswith("does not hold 4 workers of 4 cpu, 4 GiB at once")
