"""Placement: feasible nodes (READY, fits, GPU model), the cheapest for the request, then the best fit on its
dominant resource; gangs all or nothing on the cheapest set; the budget estimate from the chosen nodes' prices."""

from __future__ import annotations

from services.scheduler.core import GIB, Node, NodeState, Prices, Quota, Resources
from tests.scheduler.policy import POOL, cpu, cycle, job, make_scheduler, running, submit

_QUOTA = Quota("a", POOL, Resources(1000_000, 4096 * GIB, 64))


def _prices(cpu_micros: int, gpu: dict[str, int] | None = None) -> Prices:
    return Prices(cpu_micros, 0, gpu or {})


def test_the_cheaper_feasible_node_is_chosen() -> None:
    sched = make_scheduler(
        [
            Node("expensive", POOL, cpu(8, 32), prices=_prices(3_000_000)),
            Node("cheap", POOL, cpu(2, 32), prices=_prices(1_000_000)),
            Node("cheapest-but-draining", POOL, cpu(8, 32), prices=_prices(500_000), state=NodeState.DRAINING),
        ],
        [_QUOTA],
    )
    submit(sched, job("j0", "a", cpu(2)), job("j1", "a", cpu(2)))
    result = cycle(sched)
    assert [(a.job_id, a.nodes) for a in result.admitted] == [("j0", ("cheap",)), ("j1", ("expensive",))]
    # The estimate is priced by the node it runs on: 2 cores x 1 (then 3) unit per hour x 1 hour (pool default).
    assert [a.estimated_cost_micros for a in result.admitted] == [2_000_000, 6_000_000]


def test_best_fit_on_the_dominant_resource_among_equal_prices() -> None:
    sched = make_scheduler(
        [Node("roomy", POOL, cpu(16, 64)), Node("snug", POOL, cpu(4, 64)), Node("tiny", POOL, cpu(2, 64))],
        [_QUOTA],
    )
    submit(sched, job("j0", "a", cpu(3, 1)))
    # Equal prices: the least CPU left over (its dominant resource) is snug's 1 core; tiny cannot hold it.
    assert cycle(sched).admitted[0].nodes == ("snug",)


def test_gpu_model_is_matched_and_cpu_work_keeps_off_gpu_nodes() -> None:
    gpu_prices = _prices(1_000_000, {"a100": 2_000_000, "h100": 4_000_000})
    sched = make_scheduler(
        [
            Node("h100-node", POOL, Resources(8000, 64 * GIB, 4, "h100"), prices=gpu_prices),
            Node("a100-node", POOL, Resources(8000, 64 * GIB, 4, "a100"), prices=gpu_prices),
            Node("cpu-node", POOL, cpu(8, 64), prices=gpu_prices),
        ],
        [_QUOTA],
    )
    submit(
        sched,
        job("wants-h100", "a", cpu(1, 1, gpus=1, gpu_type="h100")),
        job("any-gpu", "a", cpu(1, 1, gpus=1)),
        job("cpu-only", "a", cpu(1, 1)),
    )
    placed = {a.job_id: a.nodes for a in cycle(sched).admitted}
    # "any" GPU takes the cheaper model; CPU work, equally priced everywhere, keeps off GPU nodes.
    assert placed == {"wants-h100": ("h100-node",), "any-gpu": ("a100-node",), "cpu-only": ("cpu-node",)}


def test_a_gang_is_all_or_nothing() -> None:
    sched = make_scheduler([Node(f"n{i}", POOL, cpu(4, 16)) for i in range(3)], [_QUOTA])
    submit(sched, job("filler", "a", cpu(4)))
    cycle(sched)
    submit(sched, job("gang", "a", cpu(4), workers=3))
    result = cycle(sched)
    # Two of three workers would fit: none is placed, nothing is held for it.
    assert result.admitted == [] and sched.allocated(POOL) == cpu(4)
    assert (
        sched.reason("gang")
        == "waiting for capacity: the free room in pool p does not hold 3 workers of 4 cpu, 0 GiB at once"
    )
    assert sched.release("filler")
    admitted = cycle(sched).admitted
    assert [a.job_id for a in admitted] == ["gang"] and sorted(admitted[0].nodes) == ["n0", "n1", "n2"]
    assert sched.allocated(POOL) == cpu(12)


def test_a_gang_takes_the_cheapest_set_that_fits() -> None:
    sched = make_scheduler(
        [
            Node("mid", POOL, cpu(8, 32), prices=_prices(2_000_000)),
            Node("cheap", POOL, cpu(4, 32), prices=_prices(1_000_000)),
            Node("dear", POOL, cpu(8, 32), prices=_prices(5_000_000)),
        ],
        [_QUOTA],
    )
    submit(sched, job("gang", "a", cpu(2), workers=5, max_run_seconds=1800))
    admitted = cycle(sched).admitted[0]
    assert sorted(admitted.nodes) == ["cheap", "cheap", "mid", "mid", "mid"]
    # 2 workers x 2 cores x 1 + 3 x 2 x 2 units per hour, for half an hour.
    assert admitted.estimated_cost_micros == (4 * 1_000_000 + 6 * 2_000_000) // 2
    assert running(sched) == {"gang"}


def test_cost_is_exact_and_rounded_up_once() -> None:
    prices = Prices(cpu_core_hour_micros=1_000_001, memory_gib_hour_micros=3, gpu_hour_micros={"t4": 7})
    r = Resources(1500, 3 * GIB // 2, 1, "t4")
    # 1.5 x 1,000,001 + 1.5 x 3 + 7 = 1,500,013 micros per hour; 1 s of it is 416.67, rounded up.
    assert prices.cost_micros(r, 3600) == 1_500_013
    assert prices.cost_micros(r, 1) == 417
    assert prices.cost_micros(r, 0) == 0


def test_a_resource_the_job_does_not_ask_for_never_blocks_it() -> None:
    """Regression: a preemptor's reservation overcommits the node's GPU while its victim stops; a CPU-only job was
    refused the node's free cores because the GPU's free count was negative."""
    sched = make_scheduler(
        [Node("g1", POOL, Resources(4000, 16 * GIB, 1, "t4"), prices=_prices(1_000_000, {"t4": 1_000_000}))],
        [_QUOTA],
    )
    submit(sched, job("gpu-low", "a", cpu(1, 1, gpus=1, gpu_type="t4")))
    cycle(sched)
    submit(sched, job("gpu-high", "a", cpu(1, 1, gpus=1, gpu_type="t4"), priority=10))
    assert [p.job_id for p in cycle(sched).preempted] == ["gpu-low"]
    submit(sched, job("cpu-only", "a", cpu(1, 1)))
    assert [a.job_id for a in cycle(sched).admitted] == ["cpu-only"]
