"""Bad input raises the typed error (which the mesh maps to its gRPC status) and changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import grpc
import pytest

from services.scheduler.core import (
    GIB,
    DuplicateJob,
    InvalidConfig,
    InvalidJob,
    InvalidQuota,
    Job,
    Node,
    NodeState,
    Pool,
    Prices,
    Quota,
    Resources,
    Scheduler,
    UnknownNode,
)
from tests.scheduler.policy import POOL, cpu, cycle, job, make_scheduler, submit


def _scheduler() -> Scheduler:
    """Two 8-core nodes; tenant a runs 3 cores (1 borrowed from b), 2 jobs queued."""
    sched = make_scheduler(
        [Node("n1", POOL, cpu(8, 32)), Node("n2", POOL, cpu(8, 32))],
        [
            Quota("a", POOL, cpu(2, 8), cohort="c", max_running_jobs=5),
            Quota("b", POOL, cpu(2, 8), cohort="c"),
        ],
        max_run_seconds=3600,
    )
    submit(sched, job("r1", "a", cpu(2, 1)), job("r2", "a", cpu(1, 1)))
    cycle(sched)
    submit(sched, job("q1", "a", cpu(1)), job("q2", "b", cpu(7)))
    return sched


def _snapshot(sched: Scheduler) -> object:
    return (
        sorted(sched.queued_jobs()),
        sorted(sched.admitted_jobs()),
        {t: sched.usage(t, POOL) for t in ("a", "b")},
        {t: sched.quota(t, POOL) for t in ("a", "b")},
        sched.nodes(),
        sched.pools(),
        {j: sched.queue_position(j) for j in sched.queued_jobs()},
    )


_W = cpu(1)
_JOBS: list[tuple[str, Job, str]] = [
    ("unknown pool", replace(job("x", "a"), pool="nope"), "unknown pool 'nope'"),
    ("negative cpu", job("x", "a", Resources(-1000, 0)), "must not be negative"),
    ("negative memory", job("x", "a", Resources(1000, -GIB)), "must not be negative"),
    ("nothing requested", job("x", "a", Resources()), "requests no resources"),
    ("gpu type without gpus", job("x", "a", Resources(1000, 0, 0, "a100")), "GPU type without GPUs"),
    ("priority too high", job("x", "a", priority=1001), "priority must be between 0 and 1000"),
    ("priority negative", job("x", "a", priority=-1), "priority must be between 0 and 1000"),
    ("no workers", job("x", "a", workers=0), "workers must be between 1 and"),
    ("absurd cpu", job("x", "a", cpu(10**9)), "no node of pool p can hold 1000000000 cpu"),
    ("absurd memory", job("x", "a", cpu(1, 10**6)), "no node of pool p can hold"),
    ("no such GPU model", job("x", "a", cpu(1, 1, 1, "h100")), "no node of pool p has GPUs of type h100"),
    ("gang no pool holds", job("x", "a", cpu(6), workers=3), "a gang of 3 workers (6 cpu, 0 GiB each) is bigger"),
    ("run longer than the pool allows", job("x", "a", max_run_seconds=3601), "max run duration"),
    ("run duration not a number", job("x", "a", max_run_seconds=float("nan")), "max run duration"),
    ("empty tenant", job("x", ""), "tenant is empty"),
    ("empty job id", job("", "a"), "job_id is empty"),
]


@pytest.mark.parametrize(("case", "bad", "message"), _JOBS, ids=[c[0] for c in _JOBS])
def test_bad_jobs_are_invalid_arguments_and_change_nothing(case: str, bad: Job, message: str) -> None:
    sched = _scheduler()
    before = _snapshot(sched)
    for call in (sched.validate, sched.enqueue):
        with pytest.raises(InvalidJob, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
            call(bad)
        assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidJob):
        sched.restore(bad, ["n1"] * max(bad.workers, 1))
    assert _snapshot(sched) == before


def test_a_duplicate_job_id_is_refused() -> None:
    sched = _scheduler()
    before = _snapshot(sched)
    for existing in ("q1", "r1"):
        with pytest.raises(DuplicateJob) as raised:
            sched.enqueue(job(existing, "a"))
        assert raised.value.code is grpc.StatusCode.ALREADY_EXISTS
    assert _snapshot(sched) == before


_QUOTAS: list[tuple[str, Quota, type[Exception], str]] = [
    ("below what it holds", Quota("a", POOL, cpu(2, 8)), InvalidQuota, "holds 3 cpu, more than the new quota allows"),
    (
        "borrowing limit below what it holds",
        Quota("a", POOL, cpu(2, 8), borrowing_limit=cpu(0.5), cohort="c"),
        InvalidQuota,
        "more than the new quota allows",
    ),
    ("running jobs", Quota("a", POOL, cpu(8, 8), cohort="c", max_running_jobs=1), InvalidQuota, "runs 2 jobs"),
    (
        "cohort would lend less than is borrowed",
        Quota("b", POOL, cpu(2, 8), lending_limit=cpu(0), cohort="c"),
        InvalidQuota,
        "cohort c of pool p would lend less cpu than its members borrow now",
    ),
    ("unknown pool", Quota("a", "nope", cpu(2)), InvalidConfig, "unknown pool 'nope'"),
    ("negative nominal", Quota("a", POOL, cpu(-1)), InvalidConfig, "must not be negative"),
    ("lending above nominal", Quota("a", POOL, cpu(2), lending_limit=cpu(3), cohort="c"), InvalidConfig, "exceeds"),
    ("limits without a cohort", Quota("a", POOL, cpu(4), borrowing_limit=cpu(1)), InvalidConfig, "need a cohort"),
    ("negative weight", Quota("a", POOL, cpu(4), cohort="c", weight=-1), InvalidConfig, "weight"),
    ("weight not a number", Quota("a", POOL, cpu(4), cohort="c", weight=float("nan")), InvalidConfig, "weight"),
]


@pytest.mark.parametrize(("case", "bad", "error", "message"), _QUOTAS, ids=[c[0] for c in _QUOTAS])
def test_bad_quotas_are_refused_and_change_nothing(case: str, bad: Quota, error: type[Exception], message: str) -> None:
    sched = _scheduler()
    before = _snapshot(sched)
    with pytest.raises(error, match=message) as raised:
        sched.set_quota(bad)
    expected = grpc.StatusCode.FAILED_PRECONDITION if error is InvalidQuota else grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.code is expected  # type: ignore[attr-defined]
    assert _snapshot(sched) == before
    # And the old quota still governs: a's queued job fits the cohort's lendable room and is admitted.
    assert [a.job_id for a in cycle(sched).admitted] == ["q1"]


_CONFIG: list[tuple[str, Callable[[Scheduler], object], type[Exception], str]] = [
    ("node of an unknown pool", lambda s: s.upsert_node(Node("n9", "nope", cpu(1))), InvalidConfig, "unknown pool"),
    ("negative capacity", lambda s: s.upsert_node(Node("n9", POOL, cpu(-1))), InvalidConfig, "must not be negative"),
    (
        "GPU model without a price",
        lambda s: s.upsert_node(Node("n9", POOL, Resources(1000, 0, 1, "b200"))),
        InvalidConfig,
        "no GPU price for type 'b200'",
    ),
    (
        "pool without a run limit",
        lambda s: s.upsert_pool(Pool("q", Prices(), max_run_seconds=0)),
        InvalidConfig,
        "max run duration",
    ),
    ("negative price", lambda s: s.upsert_pool(Pool("q", Prices(-1), 60)), InvalidConfig, "non-negative integer"),
    ("unknown node", lambda s: s.set_node_state("n9", NodeState.DRAINING), UnknownNode, "unknown node 'n9'"),
    (
        "node moved away with jobs on it",
        lambda s: (s.upsert_pool(Pool("q", Prices(), 60)), s.upsert_node(Node("n1", "q", cpu(8, 32)))),
        InvalidConfig,
        "runs jobs of pool p",
    ),
]


@pytest.mark.parametrize(("case", "call", "error", "message"), _CONFIG, ids=[c[0] for c in _CONFIG])
def test_bad_pools_and_nodes_are_refused_and_change_nothing(
    case: str, call: Callable[[Scheduler], object], error: type[Exception], message: str
) -> None:
    sched = _scheduler()
    before = _snapshot(sched)
    with pytest.raises(error, match=message):
        call(sched)
    after = _snapshot(sched)
    if case == "node moved away with jobs on it":
        after = after[:5] + (before[5],) + after[6:]  # type: ignore[index, operator]  # pool q was created
    assert after == before
