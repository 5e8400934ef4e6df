"""Price book behaviour on the core (real SQLite store, a settable clock): effective-dated versions with the
month's tier position carried across a version change, tenant books, committed plans, plan changes, and
event counts at tier bounds consistent with each event's attribution."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.billing.core.model import (
    DEFAULT_PLAN,
    LineKind,
    MeterPrice,
    Plan,
    PlanKind,
    PriceBook,
    PriceTier,
    UsageEvent,
)
from services.billing.core.periods import HOUR_NS, from_datetime
from services.billing.core.pricebook import default_price_book
from services.billing.core.quantities import NANOS
from services.billing.core.service import BillingCore
from services.mesh.errors import InvalidArgument
from tests.billing.conftest import Clock, make_core

FEB = from_datetime(datetime(2025, 2, 1, tzinfo=UTC))
MAR = from_datetime(datetime(2025, 3, 1, tzinfo=UTC))
APR = from_datetime(datetime(2025, 4, 1, tzinfo=UTC))


def _book_with_request_price(micros_per_million: int, free: int = 0, bound: int | None = None) -> PriceBook:
    """The default book with inference_requests repriced: ``micros_per_million`` up to ``bound`` (then double)."""
    base = default_price_book("USD")
    tiers = (
        (PriceTier(None, micros_per_million, 10**6 * NANOS),)
        if bound is None
        else (
            PriceTier(bound * NANOS, micros_per_million, 10**6 * NANOS),
            PriceTier(None, 2 * micros_per_million, 10**6 * NANOS),
        )
    )
    plans = []
    for plan in base.plans:
        prices = tuple(
            MeterPrice("inference_requests", (), free * NANOS, tiers) if p.meter == "inference_requests" else p
            for p in plan.prices
        )
        plans.append(replace(plan, prices=prices))
    return replace(base, plans=tuple(plans))


def _requests(core: BillingCore, tenant: str, start: int, hours: range, per_event: int, prefix: str) -> None:
    core.record_usage(
        [
            UsageEvent("serving", f"{prefix}-{h}", tenant, "inference_requests", str(per_event), start + h * HOUR_NS)
            for h in hours
        ]
    )


def test_a_new_version_prices_usage_from_its_effective_hour_and_tiers_carry_over(
    core: BillingCore, clock: Clock
) -> None:
    clock.ns = FEB - HOUR_NS
    # v2: 1.00 per million up to 3M, then 2.00; effective at Feb 10 00:00.
    switch = FEB + 9 * 24 * HOUR_NS
    v2 = core.set_price_book(replace(_book_with_request_price(1_000_000, bound=3_000_000), effective_ns=switch))
    assert v2.version == 2 and v2.effective_ns == switch
    clock.ns = MAR + HOUR_NS
    # 2M requests before the switch (1M free + 1M at the default 0.20), 2M after (1M at 1.00, 1M at 2.00).
    _requests(core, "acme", FEB, range(2), 1_000_000, "before")
    _requests(core, "acme", switch, range(2), 1_000_000, "after")
    invoice = core.create_invoice("acme", FEB)
    usage = {
        (line.version, line.tier_index): (line.quantity_nanos // NANOS, line.amount_micros) for line in invoice.lines
    }
    assert usage == {
        (1, -1): (1_000_000, 0),
        (1, 0): (1_000_000, 200_000),
        (2, 0): (1_000_000, 1_000_000),  # the month's position continues at 2M, so v2's tier 1 holds 1M more
        (2, 1): (1_000_000, 2_000_000),
    }
    assert invoice.versions == (1, 2)
    assert invoice.total_micros == 3_200_000
    assert core.price_book("acme", switch - 1).version == 1 and core.price_book("acme", switch).version == 2


def test_a_tenant_book_overrides_the_default_from_its_effective_time(core: BillingCore, clock: Clock) -> None:
    clock.ns = FEB - HOUR_NS
    own = core.set_price_book(replace(_book_with_request_price(500_000), tenant="acme", effective_ns=FEB))
    assert own.version == 1 and own.tenant == "acme"
    clock.ns = MAR + HOUR_NS
    _requests(core, "acme", FEB, range(3), 1_000_000, "a")
    _requests(core, "globex", FEB, range(3), 1_000_000, "g")
    acme = core.create_invoice("acme", FEB)
    globex = core.create_invoice("globex", FEB)
    assert acme.total_micros == 1_500_000  # 3M at 0.50 per million, no free tier in acme's book
    assert globex.total_micros == 400_000  # default: 1M free, 2M at 0.20
    assert {line.book for line in acme.lines} == {"acme"}
    assert core.price_book("globex").tenant == "" and core.price_book("acme").tenant == "acme"


def test_a_committed_plan_charges_the_shortfall(core: BillingCore, clock: Clock) -> None:
    clock.ns = FEB - HOUR_NS
    core.set_tenant_plan("acme", "committed-10k", FEB)
    clock.ns = MAR + HOUR_NS
    core.record_usage([UsageEvent("training", "job-1", "acme", "gpu_seconds", "36000", FEB + HOUR_NS)])
    invoice = core.create_invoice("acme", FEB)
    assert invoice.plan == "committed-10k"
    usage = [line for line in invoice.lines if line.kind is LineKind.USAGE]
    assert [line.amount_micros for line in usage] == [15_000_000]  # 10 GPU-hours at 1.50 (25% off 2.00)
    shortfall = [line for line in invoice.lines if line.kind is LineKind.COMMITMENT_SHORTFALL]
    assert [line.amount_micros for line in shortfall] == [10_000_000_000 - 15_000_000]
    assert invoice.total_micros == 10_000_000_000 == sum(line.amount_micros for line in invoice.lines)
    # Usage above the commitment has no shortfall line.
    core.record_usage([UsageEvent("training", "job-2", "acme", "gpu_seconds", "36000000", FEB + 2 * HOUR_NS)])
    invoice = core.create_invoice("acme", FEB)
    assert all(line.kind is LineKind.USAGE for line in invoice.lines)
    assert invoice.total_micros == 15_000_000 + 15_000_000_000


def test_plans_change_only_at_month_starts_and_must_exist(core: BillingCore, clock: Clock) -> None:
    clock.ns = FEB + 5 * 24 * HOUR_NS
    assert core.set_tenant_plan("acme", "committed-10k").start_ns == MAR  # default: next month
    with pytest.raises(InvalidArgument, match="before the current month"):
        core.set_tenant_plan("acme", "committed-10k", from_datetime(datetime(2025, 1, 1, tzinfo=UTC)))
    with pytest.raises(InvalidArgument, match="no plan"):
        core.set_tenant_plan("acme", "gold", APR)
    clock.ns = MAR + HOUR_NS
    assert core.balance("acme").plan == "committed-10k"
    assert core.balance("globex").plan == DEFAULT_PLAN


def test_events_at_a_tier_bound_are_counted_where_their_quantity_begins(core: BillingCore, clock: Clock) -> None:
    """Several events in one hour cell cross the free bound: the invoice's event counts and each event's own
    attribution agree, and costs add up."""
    clock.ns = MAR + HOUR_NS
    quantities = ["300000", "500000", "400000", "0", "250000"]  # crosses 1,000,000 in the third event
    core.record_usage(
        [
            UsageEvent(
                "serving", f"r{i}", "acme", "inference_requests", q, FEB + 5 * HOUR_NS + i * NANOS, {"model": "m"}
            )
            for i, q in enumerate(quantities)
        ]
    )
    invoice = core.create_invoice("acme", FEB)
    lines = {line.line_id: line for line in invoice.lines}
    tiers = {line.tier_index: line for line in invoice.lines}
    assert tiers[-1].event_count == 3 and tiers[0].event_count == 2
    assert tiers[0].quantity_nanos == 450_000 * NANOS
    found = [core.usage_event("acme", "serving", f"r{i}") for i in range(len(quantities))]
    assert [lines[f.line_id].tier_index for f in found] == [-1, -1, -1, 0, 0]
    assert sum(f.cost_micros or 0 for f in found) == invoice.total_micros == 90_000
    assert found[2].cost_micros == 40_000  # 200,000 of its 400,000 requests are past the free million


def test_price_book_rules(core: BillingCore, clock: Clock) -> None:
    base = default_price_book("USD")
    clock.ns = FEB + 30 * 60 * NANOS
    with pytest.raises(InvalidArgument, match="whole hour"):
        core.set_price_book(replace(base, effective_ns=FEB + 2 * HOUR_NS + 1))
    without_default = replace(base, plans=tuple(p for p in base.plans if p.name != DEFAULT_PLAN))
    with pytest.raises(InvalidArgument, match="on-demand"):
        core.set_price_book(replace(without_default, effective_ns=FEB + 2 * HOUR_NS))
    bad_commitment = replace(base, plans=(*base.plans, Plan("committed-0", PlanKind.COMMITTED, base.plans[0].prices)))
    with pytest.raises(InvalidArgument, match="positive monthly_commitment"):
        core.set_price_book(replace(bad_commitment, effective_ns=FEB + 2 * HOUR_NS))
    referenced = replace(
        base.plans[0],
        prices=(
            *base.plans[0].prices,
            MeterPrice("gpu_seconds", (("request_id", "x"),), 0, base.plans[0].prices[0].tiers),
        ),
    )
    with pytest.raises(InvalidArgument, match="request_id"):
        core.set_price_book(replace(base, plans=(referenced,), effective_ns=FEB + 2 * HOUR_NS))
    # Unset effective time: the next whole hour.
    assert core.set_price_book(replace(base, effective_ns=0)).effective_ns == FEB + HOUR_NS


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 27 * 24 - 1), st.sampled_from(["a", "b", "c"]), st.integers(0, 3_000_000)),
        min_size=1,
        max_size=40,
    ),
    st.sampled_from([None, 3, 14]),
)
def test_pricing_from_sums_equals_walking_every_hour(
    events: list[tuple[int, str, int]], switch_day: int | None
) -> None:
    """The invoice path prices stretches from database sums and walks cells only near tier bounds; the result
    (quantities, event counts, amounts per line) equals walking every hourly cell in order."""
    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock(FEB - HOUR_NS)
        core = make_core(Path(tmp) / "billing.db", clock)
        try:
            if switch_day is not None:
                book = _book_with_request_price(700_000, free=500_000, bound=4_000_000)
                core.set_price_book(replace(book, effective_ns=FEB + switch_day * 24 * HOUR_NS))
            clock.ns = MAR + HOUR_NS
            core.record_usage(
                [
                    UsageEvent(
                        "serving", f"e{i}", "acme", "inference_requests", str(q), FEB + h * HOUR_NS + i, {"model": m}
                    )
                    for i, (h, m, q) in enumerate(events)
                ]
            )
            with core._store.snapshot() as tx:
                fast = core._price_month(tx, "acme", FEB).lines()
                walk = core._pricer(tx, "acme", FEB).add_all(core._cells(tx.rollups("acme", FEB, MAR))).lines()
            summary = [(x.key, x.quantity_nanos, x.event_count, x.amount_micros) for x in fast]
            assert summary == [(x.key, x.quantity_nanos, x.event_count, x.amount_micros) for x in walk]
            assert sum(x.event_count for x in fast) == len(events)
        finally:
            core._store.db.dispose()
