"""Budgets and prepaid credit: CheckBudget from the cached read model, enforcement, 80%/100% alerts raised
once per month (by the background refresher too), credit grants and exhaustion."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text

from services.billing.client import money, usage_event
from services.billing.core.model import AlertKind, UsageEvent
from services.billing.core.periods import HOUR_NS, month_start, next_month
from services.billing.core.service import BillingCore
from services.billing.schema import MIGRATIONS, budget_alerts
from services.gen.aidc.billing.v1 import billing_service_pb2 as pb
from services.mesh import errors
from services.mesh.db import open_database
from tests.billing.conftest import NOW, Clock, RunningBilling, make_core
from tests.conftest import RunningAuth


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
    # From memory, so it answers in microseconds: timed by tests/bench/bench_billing.py (goal < 1 ms), not here.
    for _ in range(1000):
        assert core.check_budget("acme", 1_000_000, "USD").allowed


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


# -- who may change what in a budget ----------------------------------------------------------------------------

_USD = 1_000_000  # micros of one USD

#: (what happened before, in order: (who, limit USD, enforce, prepaid)), then the change asked for, and what results:
#: the budget as (limit USD, enforce, prepaid, platform limit USD, platform enforce), or the refusal's words.
#: ``prepaid`` None: not sent. A limit of None removes the budget (or keeps only prepaid).
_Step = tuple[str, int | None, bool, bool | None]
_BUDGET_RULES: list[tuple[str, list[_Step], _Step, tuple[Any, ...] | str]] = [
    ("a tenant sets its own budget", [], ("tenant", 100, True, None), (100, True, False, None, False)),
    (
        "and raises it again",
        [("tenant", 100, True, None)],
        ("tenant", 200, False, None),
        (200, False, False, None, False),
    ),
    ("and removes it", [("tenant", 100, True, None)], ("tenant", None, False, None), (None, False, False, None, False)),
    ("may not make itself prepaid", [], ("tenant", 100, False, True), "prepaid is set by the platform"),
    ("may not switch prepaid off", [("platform", None, False, True)], ("tenant", 50, False, False), "prepaid is set"),
    (
        "keeps prepaid when it sends none",
        [("platform", None, False, True)],
        ("tenant", 50, False, None),
        (50, False, True, None, False),
    ),
    (
        "may repeat prepaid as it is",
        [("platform", None, False, True)],
        ("tenant", 50, True, True),
        (50, True, True, None, False),
    ),
    (
        "may not remove the budget of a prepaid tenant",
        [("platform", 100, False, True)],
        ("tenant", None, False, None),
        "may be lowered, not raised or removed",
    ),
    (
        "lowers the platform's limit",
        [("platform", 100, True, None)],
        ("tenant", 50, True, None),
        (50, True, False, 100, True),
    ),
    (
        "enforces the platform's alert-only limit",
        [("platform", 100, False, None)],
        ("tenant", 100, True, None),
        (100, True, False, 100, False),
    ),
    (
        "may not raise the platform's limit",
        [("platform", 100, True, None)],
        ("tenant", 101, True, None),
        "the platform set a monthly limit of 100.00 USD: it may be lowered, not raised or removed",
    ),
    (
        "may not remove the platform's limit",
        [("platform", 100, False, None)],
        ("tenant", None, False, None),
        "it may be lowered, not raised or removed",
    ),
    (
        "may not stop enforcing the platform's limit",
        [("platform", 100, True, None)],
        ("tenant", 50, False, None),
        "the platform enforces the monthly limit of 100.00 USD: enforcement cannot be switched off",
    ),
    (
        "goes back up to the platform's limit, not beyond",
        [("platform", 100, True, None), ("tenant", 50, True, None)],
        ("tenant", 100, True, None),
        (100, True, False, 100, True),
    ),
    (
        "after lowering it, still not above the platform's limit",
        [("platform", 100, True, None), ("tenant", 50, True, None)],
        ("tenant", 150, True, None),
        "not raised",
    ),
    (
        "the platform raises its own limit and switches prepaid off",
        [("platform", 100, True, True), ("tenant", 50, True, None)],
        ("platform", 300, False, False),
        (300, False, False, 300, False),
    ),
    (
        "the platform keeps prepaid when it sends none",
        [("platform", None, False, True)],
        ("platform", 100, True, None),
        (100, True, True, 100, True),
    ),
    (
        "the platform removes everything",
        [("platform", 100, True, True)],
        ("platform", None, False, False),
        (None, False, False, None, False),
    ),
]


def _shape(budget: pb.Budget) -> tuple[Any, ...]:
    def usd(money: Any, present: bool) -> int | None:
        return money.micros // _USD if present else None

    return (
        usd(budget.monthly_limit, budget.HasField("monthly_limit")),
        budget.enforce,
        budget.prepaid,
        usd(budget.platform_monthly_limit, budget.HasField("platform_monthly_limit")),
        budget.platform_enforce,
    )


async def test_tenants_may_only_tighten_what_the_platform_set(auth: RunningAuth, billing: RunningBilling) -> None:
    """Table-driven through the real billing and auth services: a tenant-admin's SetBudget against what a platform
    admin set before. A refusal is PERMISSION_DENIED and changes nothing."""
    anonymous = auth.client()
    admin_auth = auth.client(billing.admin_token)
    platform = billing.client()
    for number, (case, before, (who, limit, enforce, prepaid), expected) in enumerate(_BUDGET_RULES):
        tenant = f"budget-case-{number}"
        await admin_auth.create_tenant(tenant)
        await admin_auth.create_user(tenant, "boss", "correct horse battery", ["tenant-admin"])
        token = (await anonymous.login(tenant, "boss", "correct horse battery")).access_token
        clients = {"platform": platform, "tenant": billing.client(token)}

        async def set_budget(step: _Step, tenant: str = tenant, clients: Any = clients) -> pb.Budget:
            by, usd, enforced, paid = step
            cap = None if usd is None else money(usd * _USD)
            return await clients[by].set_budget(tenant, cap, enforce=enforced, prepaid=paid)

        for step in before:
            await set_budget(step)
        held = _shape((await platform.get_balance(tenant)).budget)
        if isinstance(expected, str):
            with pytest.raises(errors.PermissionDenied) as refused:
                await set_budget((who, limit, enforce, prepaid))
            assert expected in refused.value.message, case
            assert _shape((await platform.get_balance(tenant)).budget) == held, case
        else:
            assert _shape(await set_budget((who, limit, enforce, prepaid))) == expected, case
            assert _shape((await platform.get_balance(tenant)).budget) == expected, case
        await clients["tenant"].close()
    await platform.close()
    await admin_auth.close()
    await anonymous.close()


def test_budgets_from_before_platform_bounds_become_the_platforms(tmp_path: Path, clock: Clock) -> None:
    """An existing database: its budgets' limits and enforcement become the platform's bounds (nobody recorded who set
    them, so loosening them takes the platform)."""
    db = open_database(f"sqlite:///{tmp_path / 'billing.db'}")
    db.migrate(MIGRATIONS[:1], "billing")
    with db.engine.begin() as conn:  # the table as migration 1 made it before the platform's columns existed
        conn.execute(text("ALTER TABLE billing_budgets DROP COLUMN platform_limit_micros"))
        conn.execute(text("ALTER TABLE billing_budgets DROP COLUMN platform_enforce"))
        conn.execute(
            text(
                "INSERT INTO billing_budgets (tenant, limit_micros, currency, thresholds, enforce, prepaid,"
                " update_time) VALUES ('acme', 100000000, 'USD', '[80, 100]', 1, 0, 1)"
            )
        )
    db.dispose()
    core = make_core(tmp_path / "billing.db", clock)
    budget = core.set_budget("acme", 50 * _USD, "USD", enforce=True, by_platform=False)
    assert budget is not None and (budget.platform_limit_micros, budget.platform_enforce) == (100 * _USD, True)
    with pytest.raises(errors.PermissionDenied):
        core.set_budget("acme", 200 * _USD, "USD", enforce=True, by_platform=False)
    core._store.db.dispose()
