"""Quotas with Kueue ClusterQueue semantics: nominal quota, borrowing and lending inside a cohort, reclaim by
preemption, job-count limits and the pool's default quota."""

from __future__ import annotations

import pytest

from services.scheduler.core import DEFAULT_TENANT, Node, QueueFull, Quota
from tests.scheduler.policy import POOL, cpu, cycle, job, make_scheduler, running, stop_victims, submit


def test_quota_respected_and_the_waiting_jobs_say_why() -> None:
    sched = make_scheduler([Node("n1", POOL, cpu(16, 64))], [Quota("acme", POOL, cpu(4, 16))])
    jobs = [job(f"j{i}", "acme", cpu(1, 2)) for i in range(6)]
    submit(sched, *jobs)
    result = cycle(sched)
    assert [a.job_id for a in result.admitted] == ["j0", "j1", "j2", "j3"]
    assert sched.usage("acme", POOL) == cpu(4, 8)
    assert result.reasons["j4"] == "waiting for quota: cpu 4/4 in use in pool p"
    assert sched.reason("j5") == "waiting for quota: cpu 4/4 in use in pool p"
    # Capacity is free (16 cores), the quota alone holds them back; a release lets exactly one more in.
    assert sched.release("j0")
    assert [a.job_id for a in cycle(sched).admitted] == ["j4"]
    assert sched.usage("acme", POOL) == cpu(4, 8)


def test_borrowing_then_reclaim_by_preemption_then_the_victims_run_again() -> None:
    sched = make_scheduler(
        [Node("n1", POOL, cpu(8, 32))],
        [Quota("a", POOL, cpu(4, 16), cohort="team"), Quota("b", POOL, cpu(4, 16), cohort="team")],
    )
    submit(sched, *[job(f"a{i}", "a", cpu(1, 1)) for i in range(8)])
    first = cycle(sched)
    assert len(first.admitted) == 8  # b's idle nominal quota is lent to a
    assert [a.borrowing for a in first.admitted] == [False] * 4 + [True] * 4
    assert sched.shares(POOL) == {"a": pytest.approx(4 / 8), "b": 0.0}

    submit(sched, job("b0", "b", cpu(2, 2)))
    reclaim = cycle(sched)
    # b is under its nominal quota: it takes back borrowed work, a's most recently started first.
    assert [(p.job_id, p.by_job_id) for p in reclaim.preempted] == [("a7", "b0"), ("a6", "b0")]
    assert "tenant b reclaims its quota" in reclaim.preempted[0].reason
    assert reclaim.admitted == []
    assert sched.reason("b0") == "waiting for preempted jobs a6, a7 to stop"
    # The victims hold their resources until the service has stopped them; nobody is chosen twice meanwhile.
    assert cycle(sched).preempted == []
    assert sched.usage("a", POOL) == cpu(8, 8)

    stopped = stop_victims(sched, reclaim)
    assert stopped == ["a7", "a6"]
    after = cycle(sched)
    assert [a.job_id for a in after.admitted] == ["b0"]
    assert (
        sched.reason("a6")
        == "waiting for quota: cpu 6/4 of nominal in use in pool p, cohort team has 0 cpu left to lend"
    )
    # b finishes: the requeued victims run again (from their checkpoint, which the service proves).
    assert sched.release("b0")
    assert {a.job_id for a in cycle(sched).admitted} == {"a6", "a7"}


def test_borrowing_limit_caps_what_a_tenant_takes_from_the_cohort() -> None:
    sched = make_scheduler(
        [Node("n1", POOL, cpu(8, 32))],
        [
            Quota("a", POOL, cpu(2, 8), borrowing_limit=cpu(1, 8), cohort="team"),
            Quota("b", POOL, cpu(6, 24), cohort="team"),
        ],
    )
    submit(sched, *[job(f"a{i}", "a") for i in range(5)])
    assert len(cycle(sched).admitted) == 3
    assert sched.reason("a3") == "waiting for quota: cpu 3/3 in use in pool p"


def test_lending_limit_keeps_part_of_the_nominal_quota_for_its_owner() -> None:
    sched = make_scheduler(
        [Node("n1", POOL, cpu(8, 32))],
        [
            Quota("a", POOL, cpu(4, 16), cohort="team"),
            Quota("b", POOL, cpu(4, 16), lending_limit=cpu(1, 4), cohort="team"),
        ],
    )
    submit(sched, *[job(f"a{i}", "a") for i in range(8)])
    assert len(cycle(sched).admitted) == 5  # its own 4 and the 1 cpu b lends
    submit(sched, *[job(f"b{i}", "b") for i in range(3)])
    # b's 3 unlent cores are there for it without any preemption.
    result = cycle(sched)
    assert [a.job_id for a in result.admitted] == ["b0", "b1", "b2"] and result.preempted == []


def test_max_running_and_max_queued_jobs() -> None:
    sched = make_scheduler(quotas=[Quota("a", POOL, cpu(8, 32), max_running_jobs=2, max_queued_jobs=3)])
    submit(sched, job("j0", "a"), job("j1", "a"), job("j2", "a"))
    with pytest.raises(QueueFull, match="3/3 jobs queued"):
        sched.validate(job("j3", "a"))
    assert len(cycle(sched).admitted) == 2
    assert sched.reason("j2") == "waiting for quota: 2/2 running jobs in pool p"
    # A preempted or lost job is requeued past the limit: the service never drops a job it accepted.
    submit(sched, job("j3", "a"), job("j4", "a"))
    sched.enqueue(job("j5", "a"))
    assert sched.queued_count() == 4


def test_default_quota_applies_to_tenants_without_their_own() -> None:
    sched = make_scheduler(quotas=[Quota(DEFAULT_TENANT, POOL, cpu(2, 8)), Quota("big", POOL, cpu(6, 24))])
    submit(sched, *[job(f"s{i}", "small") for i in range(4)], *[job(f"b{i}", "big") for i in range(6)])
    cycle(sched)
    assert len(running(sched, "small")) == 2 and len(running(sched, "big")) == 6
    assert sched.quota("small", POOL) == Quota(DEFAULT_TENANT, POOL, cpu(2, 8))
    assert sched.quota("unknown", POOL) == Quota(DEFAULT_TENANT, POOL, cpu(2, 8))
    # Raising the default raises it for every tenant that has no quota of its own.
    sched.set_quota(Quota(DEFAULT_TENANT, POOL, cpu(3, 8)))
    cycle(sched)
    assert len(running(sched, "small")) == 2  # the node is full (8 cores): capacity now, not quota
    assert sched.reason("s2") == "waiting for capacity: no READY node in pool p has 1 cpu, 0 GiB free"


def test_a_tenant_without_any_quota_waits_with_the_reason() -> None:
    sched = make_scheduler()
    submit(sched, job("j0", "nobody"))
    result = cycle(sched)
    assert result.admitted == []
    assert result.reasons["j0"] == "waiting for quota: tenant nobody has no quota in pool p"
