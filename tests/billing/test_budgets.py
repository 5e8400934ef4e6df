"""Budgets and prepaid credit: CheckBudget from the cached read model, enforcement, 80%/100% alerts raised
once per month (by the background refresher too), credit grants and exhaustion."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, select

from services.billing.client import money, usage_event
from services.billing.core.model import AlertKind, UsageEvent
from services.billing.core.periods import HOUR_NS, month_start, next_month
from services.billing.core.service import BillingCore
from services.billing.schema import budget_alerts
from services.gen.aidc.billing.v1 import billing_service_pb2 as pb
from services.mesh import errors
from tests.billing.conftest import NOW, Clock, RunningBilling


def _gpu(core: BillingCore, id: str, seconds: int, at: int = NOW - HOUR_NS) -> None:
    """Catch-all GPU time: 2.00 per GPU-hour."""
    core.record_usage([UsageEvent("training", id, "acme", "gpu_seconds", str(seconds), at)])


def test_check_budget_enforces_the_monthly_limit(core: BillingCore) -> None:
    assert core.check_budget("acme", 0, "").allowed  # no budget: nothing limits spend
    assert core.check_budget("acme", 0, "").remaining_micros is None
    core.set_budget("acme", 10_000_000, "USD", enforce=True)
    _gpu(core, "j1", 3 * 3600)  # 6.00
    core.budgets.refresh_dirty()
    check = core.check_budget("acme", 3_000_000, "USD")
    assert check.allowed and check.remaining_micros == 4_000_000
    check = core.check_budget("acme", 5_000_000, "USD")
    assert not check.allowed and "monthly budget of 10.00 USD would be exceeded" in check.reason
    _gpu(core, "j2", 2 * 3600)  # 10.00 in total: the budget is used up
    core.budgets.refresh_dirty()
    check = core.check_budget("acme", 0, "")
    assert not check.allowed and "reached" in check.reason and check.remaining_micros == 0


def test_a_budget_without_enforcement_only_alerts(core: BillingCore) -> None:
    core.set_budget("acme", 1_000_000, "USD")
    _gpu(core, "j1", 3600)  # 2.00: 200%
    core.budgets.refresh_dirty()
    assert core.check_budget("acme", 1_000_000, "USD").allowed
    kinds = sorted((a.kind.value, a.threshold_percent) for a in core.alerts("acme").items)
    assert kinds == [("threshold", 80), ("threshold", 100)]


def test_alerts_fire_once_per_threshold_and_month(core: BillingCore, clock: Clock) -> None:
    core.set_budget("acme", 10_000_000, "USD", thresholds=[50, 80, 100])
    _gpu(core, "j1", 4 * 3600 + 1800)  # 9.00: 90%
    core.budgets.refresh_dirty()
    alerts = core.alerts("acme").items
    assert sorted(a.threshold_percent for a in alerts) == [50, 80]
    assert all(a.month_to_date_micros == 9_000_000 and a.limit_micros == 10_000_000 for a in alerts)
    _gpu(core, "j2", 1800)  # 10.00: 100%
    core.budgets.refresh_dirty()
    core.budgets.refresh_dirty()
    assert sorted(a.threshold_percent for a in core.alerts("acme").items) == [50, 80, 100]
    # A new month starts from zero: no alert until its own usage crosses a threshold.
    clock.ns = next_month(month_start(NOW)) + HOUR_NS
    assert core.check_budget("acme", 0, "").allowed
    assert core.balance("acme").month_to_date_micros == 0
    assert len(core.alerts("acme").items) == 3


def test_prepaid_credit_limits_spend_and_raises_an_exhaustion_alert(core: BillingCore) -> None:
    core.set_budget("acme", None, "", prepaid=True)
    grant, balance = core.grant_credit("user:platform/admin", "acme", "welcome", 5_000_000, "USD", "welcome")
    assert balance.credit_micros == 5_000_000 and grant.granted_by == "user:platform/admin"
    again, _ = core.grant_credit("user:platform/admin", "acme", "welcome", 5_000_000, "USD", "retry")
    assert again == grant  # idempotent on grant_id
    with pytest.raises(errors.AlreadyExists):
        core.grant_credit("user:platform/admin", "acme", "welcome", 7_000_000, "USD")
    _gpu(core, "j1", 3600)  # 2.00
    core.budgets.refresh_dirty()
    check = core.check_budget("acme", 4_000_000, "USD")
    assert not check.allowed and "prepaid credit exhausted" in check.reason and check.remaining_micros == 3_000_000
    _gpu(core, "j2", 2 * 3600)  # 6.00 in total > 5.00 of credit
    core.budgets.refresh_dirty()
    assert not core.check_budget("acme", 0, "").allowed
    assert [a.kind for a in core.alerts("acme").items] == [AlertKind.CREDIT_EXHAUSTED]


def test_check_budget_answers_from_memory(core: BillingCore, monkeypatch: pytest.MonkeyPatch) -> None:
    core.set_budget("acme", 10_000_000, "USD", enforce=True)
    assert core.check_budget("acme", 0, "").allowed

    def no_database() -> None:
        raise AssertionError("CheckBudget touched the database")

    monkeypatch.setattr(core._store, "snapshot", no_database)
    monkeypatch.setattr(core._store, "transaction", no_database)
    started = time.perf_counter()
    for _ in range(1000):
        core.check_budget("acme", 1_000_000, "USD")
    assert (time.perf_counter() - started) / 1000 < 0.001


async def test_the_service_raises_alerts_in_the_background(billing: RunningBilling) -> None:
    client = billing.client()
    budget = await client.set_budget("acme", money(1_000_000), enforce=True)
    assert budget.monthly_limit.micros == 1_000_000 and list(budget.alert_threshold_percents) == [80, 100]
    assert (await client.check_budget("acme", money(0), as_caller=True)).allowed
    await client.record_usage(
        [usage_event(source="training", id="j1", tenant="acme", meter="gpu_seconds", quantity="3600")]
    )
    # Nobody asks about acme's budget: the refresher (every 0.2 s here) must raise the alerts by itself.
    engine = create_engine(billing.settings.database_url_for("billing"))
    deadline = time.monotonic() + 10
    thresholds: list[int] = []
    while time.monotonic() < deadline and len(thresholds) < 2:
        await asyncio.sleep(0.2)
        with engine.connect() as conn:
            thresholds = sorted(conn.execute(select(budget_alerts.c.threshold)).scalars())
    engine.dispose()
    assert thresholds == [80, 100]
    check = await client.check_budget("acme", money(1), as_caller=True)
    assert not check.allowed and "reached" in check.reason
    alerts = await client.list_budget_alerts("acme")
    assert {(a.kind, a.threshold_percent) for a in alerts} == {
        (pb.BUDGET_ALERT_KIND_THRESHOLD, 80),
        (pb.BUDGET_ALERT_KIND_THRESHOLD, 100),
    }
    since = datetime.now(UTC)
    assert await client.list_budget_alerts("acme", since=since) == []
    balance = await client.get_balance("acme")
    assert balance.month_to_date_charges.micros == 2_000_000 and balance.remaining_budget.micros == -1_000_000
    assert balance.plan == "on-demand" and balance.budget.enforce
    removed = await client.set_budget("acme", None)
    assert not removed.HasField("monthly_limit")
    assert (await client.check_budget("acme", money(5_000_000), as_caller=True)).allowed
    await client.close()
