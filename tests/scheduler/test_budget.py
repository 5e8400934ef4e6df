"""Budget-aware admission: the cycle asks a synchronous callback with the job's estimated cost; a refused job
waits with the callback's reason, does not block other tenants, and runs once the callback allows it."""

from __future__ import annotations

from services.scheduler.core import Node, Prices, Quota
from tests.scheduler.policy import POOL, cpu, cycle, job, make_scheduler, running, submit


def test_a_job_over_budget_waits_with_its_reason_and_runs_once_allowed() -> None:
    sched = make_scheduler(
        [Node("n1", POOL, cpu(8, 32))],
        [Quota("poor", POOL, cpu(8, 32)), Quota("rich", POOL, cpu(8, 32))],
        prices=Prices(2_000_000, 0, {}),
        max_run_seconds=7200,
    )
    asked: list[tuple[str, int]] = []
    credit = {"poor": 0, "rich": 10**12}

    def budget(tenant: str, cost: int) -> tuple[bool, str]:
        asked.append((tenant, cost))
        if cost > credit[tenant]:
            return False, f"estimated cost {cost} micros exceeds the remaining budget {credit[tenant]}"
        credit[tenant] -= cost  # what the service's callback does with an allowed answer
        return True, ""

    submit(sched, job("poor-job", "poor", cpu(2)), job("rich-job", "rich", cpu(1)))
    result = cycle(sched, budget)
    # 2 cores x 2 units/hour x 2 hours (the pool's max run duration) = 8 units.
    assert ("poor", 8_000_000) in asked
    assert [a.job_id for a in result.admitted] == ["rich-job"]  # the refusal blocks nobody else
    reason = "waiting for budget: estimated cost 8000000 micros exceeds the remaining budget 0"
    assert result.reasons["poor-job"] == reason and sched.reason("poor-job") == reason
    # Nothing else changes, but the budget may: the next cycle asks again.
    assert cycle(sched, budget).admitted == []
    credit["poor"] = 8_000_000  # credit granted
    assert [a.job_id for a in cycle(sched, budget).admitted] == ["poor-job"]
    assert running(sched) == {"poor-job", "rich-job"} and sched.reason("poor-job") == ""
