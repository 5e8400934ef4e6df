"""Priority order and preemption: within a tenant (lowest priority, then most recently started), never twice,
never a non-preemptible job, borrowing while preempting only against lower priority; the preemptor waits for its
victims and nobody else takes the room they free; node loss."""

from __future__ import annotations

import pytest

from services.scheduler.core import InvalidConfig, InvalidJob, Node, NodeState, Quota, UnknownNode
from tests.scheduler.policy import POOL, cpu, cycle, job, make_scheduler, running, stop_victims, submit


def test_priority_order_within_a_tenant_then_submission_order() -> None:
    sched = make_scheduler([Node("n1", POOL, cpu(3, 32))], [Quota("a", POOL, cpu(8, 32))])
    submit(sched, job("low", "a", priority=0), job("mid1", "a", priority=500), job("high", "a", priority=900))
    submit(sched, job("mid2", "a", priority=500))
    assert [sched.queue_position(j) for j in ("high", "mid1", "mid2", "low")] == [0, 1, 2, 3]
    assert [a.job_id for a in cycle(sched).admitted] == ["high", "mid1", "mid2"]
    assert sched.reason("low") == "waiting for capacity: no READY node in pool p has 1 cpu, 0 GiB free"
    assert sched.queue_position("low") == 0


def test_within_a_tenant_the_lowest_priority_then_most_recently_started_is_preempted() -> None:
    sched = make_scheduler([Node("n1", POOL, cpu(4, 32))], [Quota("a", POOL, cpu(4, 32))])
    submit(sched, job("p100", "a", priority=100), job("p0-old", "a"), job("keep", "a", preemptible=False))
    cycle(sched)
    submit(sched, job("p0-new", "a"))
    cycle(sched)
    assert running(sched) == {"p100", "p0-old", "keep", "p0-new"}

    submit(sched, job("urgent", "a", cpu(2), priority=500))
    result = cycle(sched)
    assert [(p.job_id, p.by_job_id) for p in result.preempted] == [("p0-new", "urgent"), ("p0-old", "urgent")]
    assert result.preempted[0].reason == "preempted by job urgent of higher priority (500 > 0)"
    # A second urgent job may not take the same victims again; it takes the next one (never "keep").
    submit(sched, job("urgent2", "a", cpu(1), priority=500))
    second = cycle(sched)
    assert [(p.job_id, p.by_job_id) for p in second.preempted] == [("p100", "urgent2")]
    submit(sched, job("urgent3", "a", cpu(1), priority=500))
    third = cycle(sched)
    assert third.preempted == [] and sched.preempted_by("keep") == ""
    assert sched.reason("urgent3") == "waiting for quota: cpu 4/4 in use in pool p"

    stop_victims(sched, result)
    stop_victims(sched, second)
    assert {a.job_id for a in cycle(sched).admitted} == {"urgent", "urgent2"}


def test_the_preemptor_keeps_the_room_its_victims_free() -> None:
    sched = make_scheduler(
        [Node("n1", POOL, cpu(4, 32))],
        [
            Quota("a", POOL, cpu(4, 32), cohort="c"),
            Quota("b", POOL, cpu(0, 0), cohort="c"),
            Quota("d", POOL, cpu(1, 8)),  # standalone: it only needs room on the node
        ],
    )
    submit(sched, job("a0", "a"), job("a1", "a"), job("b0", "b"), job("b1", "b"))
    cycle(sched)
    assert running(sched) == {"a0", "a1", "b0", "b1"}  # b borrows a's 2 unused cores
    submit(sched, job("a-big", "a", cpu(2)))
    result = cycle(sched)
    assert [p.job_id for p in result.preempted] == ["b1", "b0"]  # a reclaims within its nominal quota
    submit(sched, job("d0", "d"))
    # b1 stops first: its core stays with a-big, d0 (which fits d's quota) does not get it.
    assert stop_victims(sched, type(result)(preempted=result.preempted[:1])) == ["b1"]
    assert cycle(sched).admitted == []
    assert sched.reason("a-big") == "waiting for preempted job b0 to stop"
    assert sched.reason("d0") == "waiting for capacity: no READY node in pool p has 1 cpu, 0 GiB free"
    assert sched.release("b0")
    assert [a.job_id for a in cycle(sched).admitted] == ["a-big"]


def test_borrowing_while_preempting_only_against_strictly_lower_priority() -> None:
    def scenario(priority: int) -> list[str]:
        sched = make_scheduler(
            [Node("n1", POOL, cpu(6, 32))],
            [
                Quota("a", POOL, cpu(2, 16), cohort="c"),
                Quota("b", POOL, cpu(2, 16), cohort="c"),
                Quota("idle", POOL, cpu(2, 16), cohort="c"),
            ],
        )
        submit(
            sched,
            *[job(f"b{i}", "b", priority=100) for i in range(4)],
            *[job(f"a{i}", "a", priority=100) for i in range(2)],
        )
        cycle(sched)
        assert len(running(sched, "b")) == 4  # b borrows the idle tenant's 2 cores
        submit(sched, job("a-more", "a", cpu(1), priority=priority))
        return [p.job_id for p in cycle(sched).preempted]

    assert scenario(100) == []  # a would borrow: equal priority is not enough
    assert scenario(101) == ["b3"]  # and a's share with it (1/6) <= b's without b3 (1/6)


def test_non_preemptible_jobs_are_never_preempted_even_to_reclaim() -> None:
    sched = make_scheduler(
        [Node("n1", POOL, cpu(4, 32))],
        [Quota("a", POOL, cpu(2, 16), cohort="c"), Quota("b", POOL, cpu(2, 16), cohort="c")],
    )
    submit(sched, *[job(f"a{i}", "a", preemptible=False) for i in range(4)])
    cycle(sched)
    submit(sched, job("b0", "b", priority=1000))
    result = cycle(sched)
    assert result.preempted == [] and result.admitted == []
    assert sched.reason("b0") == (
        "waiting for quota: cpu 0/2 of nominal in use in pool p, the rest is lent in cohort c until reclaimed"
    )


def test_a_lost_node_returns_its_jobs_and_a_draining_node_takes_no_new_work() -> None:
    sched = make_scheduler(
        [Node("n1", POOL, cpu(2, 8)), Node("n2", POOL, cpu(2, 8), prices=None)],
        [Quota("a", POOL, cpu(8, 32))],
    )
    gang = job("gang", "a", cpu(1), workers=3)
    submit(sched, gang, job("solo", "a"))
    cycle(sched)
    assert sorted(sched.placement("gang")) == ["n1", "n1", "n2"] and sched.placement("solo") == ("n2",)
    assert sched.set_node_state("n2", NodeState.DRAINING) == []
    assert sched.release("solo")
    submit(sched, job("next", "a"))
    assert cycle(sched).admitted == []  # n2 has room but drains
    lost = sched.set_node_state("n1", NodeState.NOT_READY)
    assert lost == ["gang"]  # the whole gang, its n2 worker too
    assert sched.usage("a", POOL) == cpu(0) and sched.allocated(POOL) == cpu(0)
    assert sched.job("gang") is None
    sched.enqueue(gang)  # the service requeues it
    assert sched.set_node_state("n2", NodeState.READY) == []
    assert [a.job_id for a in cycle(sched).admitted] == ["next"]
    assert (
        sched.reason("gang") == "waiting for capacity: the READY nodes of pool p cannot hold 3 workers of 1 cpu, 0 GiB"
    )


def test_a_cancelled_preemptor_gives_its_reservation_back() -> None:
    sched = make_scheduler([Node("n1", POOL, cpu(2, 8))], [Quota("a", POOL, cpu(2, 8))])
    submit(sched, job("low0", "a"), job("low1", "a"))
    cycle(sched)
    submit(sched, job("high", "a", cpu(2), priority=10), job("small", "a", priority=5))
    result = cycle(sched)
    assert len(result.preempted) == 2
    assert sched.dequeue("high")
    assert sched.release("low0")
    # The room low0 freed is nobody's reservation any more.
    assert [a.job_id for a in cycle(sched).admitted] == ["small"]


def test_restore_readopts_running_jobs_without_admitting_them_again() -> None:
    sched = make_scheduler([Node("n1", POOL, cpu(4, 16))], [Quota("a", POOL, cpu(2, 8))])
    sched.restore(job("old", "a", cpu(3)), ["n1"])  # more than the quota now allows: it holds it for real
    assert sched.usage("a", POOL) == cpu(3) and sched.is_admitted("old")
    submit(sched, job("new", "a"))
    result = cycle(sched)
    assert result.admitted == [] and sched.reason("new") == "waiting for quota: cpu 3/2 in use in pool p"
    assert sched.release("old")
    assert [a.job_id for a in cycle(sched).admitted] == ["new"]


def test_remove_node_only_when_it_holds_nothing() -> None:
    sched = make_scheduler([Node("n1", POOL, cpu(2, 8)), Node("n2", POOL, cpu(2, 8))], [Quota("a", POOL, cpu(8, 32))])
    submit(sched, job("j", "a", cpu(2)))
    cycle(sched)
    busy = sched.placement("j")[0]
    idle = "n2" if busy == "n1" else "n1"
    with pytest.raises(InvalidConfig, match=f"node {busy} still holds jobs"):
        sched.remove_node(busy)
    with pytest.raises(UnknownNode):
        sched.remove_node("n9")
    sched.remove_node(idle)
    assert [n.name for n in sched.nodes()] == [busy]
    # What could run before may now be a gang bigger than the pool.
    with pytest.raises(InvalidJob, match="bigger than pool p can ever hold"):
        sched.validate(job("gang", "a", cpu(2), workers=2))
    assert sched.release("j")
    sched.remove_node(busy)
    assert sched.nodes() == []


def test_a_tenant_swapping_its_own_work_is_not_taken_for_a_borrower() -> None:
    """Regression: while a's victim stops, a holds it and the reservation of its replacement; that once made a look
    like a borrower, and b reclaimed a0 from it (and later a reclaimed back: ping-pong in the simulation)."""
    sched = make_scheduler(
        [Node("n1", POOL, cpu(5, 32))],
        [
            Quota("a", POOL, cpu(2, 16), borrowing_limit=cpu(0), cohort="c"),
            Quota("b", POOL, cpu(3, 16), cohort="c"),
        ],
    )
    submit(sched, job("a0", "a"), job("a1", "a"), job("b0", "b"), job("b1", "b"))
    cycle(sched)
    submit(sched, job("a-hi", "a", priority=10))
    assert [p.job_id for p in cycle(sched).preempted] == ["a1"]
    submit(sched, job("b2", "b"))
    assert cycle(sched).preempted == []  # a stays within its nominal quota: nothing of it may be reclaimed
    assert sched.reason("b2") == "waiting for preempted jobs in pool p to stop"
    assert sched.release("a1")
    assert {a.job_id for a in cycle(sched).admitted} == {"a-hi", "b2"}
