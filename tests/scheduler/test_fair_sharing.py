"""Dominant-resource fair sharing: three tenants converge to their DRF shares, idle tenants hold none, and a steady
state stays steady (the fair-sharing preemption strategies stop ping-pong)."""

from __future__ import annotations

import random

import pytest

from services.scheduler.core import Node, Quota, drf_fair_shares
from tests.scheduler.policy import POOL, cpu, cycle, job, make_scheduler, running, stop_victims, submit

# A cohort whose lendable quota is the whole pool, held by an owner that runs nothing: A, B and C borrow all they
# use, so their fair-sharing share is their dominant share of the pool, as in the DRF paper.
_CAPACITY = cpu(15, 30)
_SHAPES = {"A": cpu(1, 4), "B": cpu(3, 1), "C": cpu(2, 2)}


def _drf_scheduler() -> object:
    return make_scheduler(
        [Node("n1", POOL, _CAPACITY)],
        [Quota("owner", POOL, _CAPACITY, cohort="all")] + [Quota(t, POOL, cpu(0), cohort="all") for t in _SHAPES],
    )


def _counts(sched: object) -> dict[str, int]:
    return {t: len(running(sched, t)) for t in _SHAPES}  # type: ignore[arg-type]


def test_drf_shares_converge_between_three_tenants() -> None:
    # By hand (progressive filling): dominant shares per task A 4/30, B 3/15, C 2/15; equal shares s need
    # 7.5s A-tasks, 5s B-tasks, 7.5s C-tasks; CPU runs out first at 7.5s + 15s + 15s = 15, s = 0.4:
    # A 3 tasks (3 cpu, 12 GiB), B 2 (6 cpu, 2 GiB), C 3 (6 cpu, 6 GiB), every dominant share 0.4.
    sched = _drf_scheduler()
    for i in range(30):
        submit(sched, *(job(f"{t}{i}", t, shape) for t, shape in _SHAPES.items()))  # type: ignore[arg-type]
    cycle(sched)  # type: ignore[arg-type]
    assert _counts(sched) == {"A": 3, "B": 2, "C": 3}
    assert sched.dominant_shares(POOL) == {  # type: ignore[attr-defined]
        "owner": 0.0,
        "A": pytest.approx(0.4),
        "B": pytest.approx(0.4),
        "C": pytest.approx(0.4),
    }
    assert sched.fair_shares(POOL) == {  # type: ignore[attr-defined]
        "owner": 0.0,
        "A": pytest.approx(0.4),
        "B": pytest.approx(0.4),
        "C": pytest.approx(0.4),
    }
    # Jobs end in random order and the queues refill the pool: it returns to the same allocation every time.
    rng = random.Random(5)
    for _ in range(40):
        sched.release(rng.choice(sorted(running(sched))))  # type: ignore[arg-type, attr-defined]
        result = cycle(sched)  # type: ignore[arg-type]
        assert result.preempted == []
        assert _counts(sched) == {"A": 3, "B": 2, "C": 3}


def test_an_idle_tenant_holds_no_fair_share() -> None:
    sched = _drf_scheduler()
    for i in range(30):
        submit(sched, job(f"A{i}", "A", _SHAPES["A"]), job(f"C{i}", "C", _SHAPES["C"]))  # type: ignore[arg-type]
    cycle(sched)  # type: ignore[arg-type]
    # B has no demand: A and C split the pool. Equal shares s: 7.5s A-tasks, 7.5s C-tasks; memory 30s + 15s = 30
    # and CPU 7.5s + 15s = 15 both give s = 2/3: A 5 tasks (20 GiB), C 5 tasks (10 cpu).
    assert _counts(sched) == {"A": 5, "B": 0, "C": 5}
    fair = sched.fair_shares(POOL)  # type: ignore[attr-defined]
    assert fair["B"] == 0.0 and fair["A"] == pytest.approx(2 / 3) and fair["C"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("demands", "weights", "expected"),
    [
        # Equal weights, same shape: half each.
        ({"a": (100, 0, 0), "b": (100, 0, 0)}, {}, {"a": 0.5, "b": 0.5}),
        # b wants only 10 %: capped at its demand, a gets the rest (Armada #3714).
        ({"a": (100, 0, 0), "b": (10, 0, 0)}, {}, {"a": 0.9, "b": 0.1}),
        # An idle tenant gets nothing.
        ({"a": (100, 0, 0), "idle": (0, 0, 0)}, {}, {"a": 1.0, "idle": 0.0}),
        # Weight 2 gets twice the share.
        ({"a": (100, 0, 0), "b": (100, 0, 0)}, {"a": 2.0}, {"a": 2 / 3, "b": 1 / 3}),
        # Dominant resources differ: a is CPU-bound, b memory-bound; each gets the same dominant share.
        ({"a": (100, 20, 0), "b": (20, 100, 0)}, {}, {"a": 100 / 120, "b": 100 / 120}),
    ],
)
def test_drf_water_filling(
    demands: dict[str, tuple[int, int, int]], weights: dict[str, float], expected: dict[str, float]
) -> None:
    shares = drf_fair_shares((100, 100, 0), demands, weights)
    assert shares == {t: pytest.approx(v, abs=1e-9) for t, v in expected.items()}


def test_a_steady_state_stays_steady() -> None:
    """Two tenants borrow the idle third's quota: b holds more, a's higher-priority work evens them out by fair
    sharing, and then neither takes from the other again, whatever they submit."""
    sched = make_scheduler(
        [Node("n1", POOL, cpu(12, 48))],
        [Quota(t, POOL, cpu(4, 16), cohort="c") for t in ("a", "b", "idle")],
    )
    submit(sched, *[job(f"b{i}", "b") for i in range(8)], *[job(f"a{i}", "a", priority=100) for i in range(4)])
    cycle(sched)
    assert (len(running(sched, "a")), len(running(sched, "b"))) == (4, 8)
    submit(sched, *[job(f"a-hi{i}", "a", priority=100) for i in range(6)])
    preemptions = []
    for _ in range(10):
        result = cycle(sched)
        preemptions += [(p.job_id, p.by_job_id) for p in result.preempted]
        stop_victims(sched, result)
    # a's share with a job must stay <= b's without its victim: 1/12 <= 3/12, 2/12 <= 2/12, then 3/12 > 1/12.
    assert [victim for victim, _ in preemptions] == ["b7", "b6"]
    assert (len(running(sched, "a")), len(running(sched, "b"))) == (6, 6)
    # Both now submit higher-priority work, round after round: each may swap its own work (priority within a
    # tenant), never take the other's.
    for round_ in range(10):
        submit(sched, job(f"a-top{round_}", "a", priority=900), job(f"b-top{round_}", "b", priority=900))
        result = cycle(sched)
        assert result.preempted == [] or all(
            sched.job(p.job_id).tenant == sched.job(p.by_job_id).tenant  # type: ignore[union-attr]
            for p in result.preempted
        ), result.preempted
        stop_victims(sched, result)
    assert (len(running(sched, "a")), len(running(sched, "b"))) == (6, 6)
    assert sched.shares(POOL)["a"] == pytest.approx(sched.shares(POOL)["b"])
