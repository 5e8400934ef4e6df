"""Exactly-once metering as properties (hypothesis), on the real store (a fresh SQLite file per example):

- any interleaving of retries and duplicate deliveries, in any batching, gives the totals of the de-duplicated
  set of events, and each delivery gets the right status;
- a conflicting duplicate (same id, other content) is rejected and never counted: the first delivery wins;
- the hourly rollups and the raw ledger answer every query identically.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.billing.core.model import Aggregation, EventStatus, UsageEvent, UsageQuery, Window
from services.billing.core.periods import HOUR_NS
from services.billing.core.quantities import NANOS, format_nanos
from services.billing.core.service import BillingCore
from tests.billing.conftest import NOW, Clock, make_core

BASE = NOW - NOW % HOUR_NS - 30 * HOUR_NS
METERS = ("gpu_seconds", "inference_requests", "storage_gib_hours")
TENANTS = ("acme", "globex")


@dataclass(frozen=True)
class Spec:
    """One distinct usage event (its id is its index)."""

    tenant: str
    meter: str
    nanos: int
    hour: int
    second: int
    model: str

    def event(self, index: int, nanos: int | None = None) -> UsageEvent:
        quantity = self.nanos if nanos is None else nanos
        return UsageEvent(
            source="serving",
            id=f"req-{index}",
            tenant=self.tenant,
            meter=self.meter,
            quantity=format_nanos(quantity),
            time_ns=BASE + self.hour * HOUR_NS + self.second * NANOS,
            attributes={"model": self.model, "request_id": f"req-{index}"},
        )


specs = st.builds(
    Spec,
    tenant=st.sampled_from(TENANTS),
    meter=st.sampled_from(METERS),
    nanos=st.one_of(st.integers(0, 10**12), st.sampled_from([1, NANOS, 10**18 - 1])),
    hour=st.integers(0, 29),
    second=st.integers(0, 3599),
    model=st.sampled_from(("bert", "gpt", "t5")),
)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[Spec], list[list[tuple[int, int | None]]]]:
    """Distinct events, and batches delivering each at least once in any order; some deliveries are retries
    (identical) and some conflicting variants (other quantity). Items are (event index, quantity override)."""
    events = draw(st.lists(specs, min_size=1, max_size=40))
    items: list[tuple[int, int | None]] = []
    for index, spec in enumerate(events):
        items += [(index, None)] * draw(st.integers(1, 3))
        if draw(st.booleans()) and draw(st.integers(0, 4)) == 0:
            items.append((index, (spec.nanos + draw(st.integers(1, 10**9))) % 10**18))
    order = draw(st.permutations(items))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=8)))
    batches, start = [], 0
    for cut in [*cuts, len(order)]:
        if cut > start:
            batches.append(list(order[start:cut]))
            start = cut
    return events, batches


def _totals(core: BillingCore, aligned: bool) -> dict[tuple[str, str, str], tuple[str, int, str]]:
    """(tenant, meter, model) -> (SUM, COUNT, MAX) over the whole range, from rollups or from the ledger."""
    start, end = (BASE, BASE + 31 * HOUR_NS) if aligned else (BASE - 1, BASE + 31 * HOUR_NS + 1)
    out = {}
    for tenant in TENANTS:
        for meter in METERS:
            found: dict[str, list[str]] = defaultdict(list)
            for aggregation in (Aggregation.SUM, Aggregation.COUNT, Aggregation.MAX):
                query = UsageQuery(tenant, meter, Window.WHOLE, aggregation, ("model",), {}, start, end, 1000)
                for bucket in core.query_usage(query).items:
                    found[bucket.group["model"]].append(bucket.value)
            for model, (total, count, largest) in found.items():
                out[(tenant, meter, model)] = (total, int(count), largest)
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deliveries())
def test_retries_and_duplicates_in_any_interleaving_count_once(
    plan: tuple[list[Spec], list[list[tuple[int, int | None]]]],
) -> None:
    events, batches = plan
    with tempfile.TemporaryDirectory() as tmp:
        core = make_core(Path(tmp) / "billing.db", Clock())
        try:
            first: dict[int, int] = {}  # event index -> quantity of its first delivery (the one that counts)
            for batch in batches:
                results = core.record_usage([events[i].event(i, q) for i, q in batch])
                for (index, override), result in zip(batch, results, strict=True):
                    quantity = events[index].nanos if override is None else override
                    if index not in first:
                        first[index] = quantity
                        assert result.status is EventStatus.ACCEPTED, result
                    elif quantity == first[index]:
                        assert result.status is EventStatus.DUPLICATE, result
                    else:
                        assert result.status is EventStatus.REJECTED, result
                        assert "conflicting duplicate: quantity differs" in result.reason

            expected: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
            for index, quantity in first.items():
                spec = events[index]
                slot = expected[(spec.tenant, spec.meter, spec.model)]
                slot[0] += quantity
                slot[1] += 1
                slot[2] = max(slot[2], quantity)
            want = {k: (format_nanos(s), c, format_nanos(m)) for k, (s, c, m) in expected.items()}
            assert _totals(core, aligned=True) == want
            assert _totals(core, aligned=False) == want
            with core._store.snapshot() as tx:
                assert tx.event_count() == len(events)
        finally:
            core._store.db.dispose()


@settings(max_examples=25, deadline=None)
@given(st.lists(specs, min_size=1, max_size=30), st.sampled_from(list(Window)), st.sampled_from(list(Aggregation)))
def test_rollups_and_ledger_agree_for_every_window_and_aggregation(
    events: list[Spec], window: Window, aggregation: Aggregation
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        core = make_core(Path(tmp) / "billing.db", Clock())
        try:
            core.record_usage([spec.event(i) for i, spec in enumerate(events)])
            for meter in METERS:
                for tenant in (*TENANTS, None):
                    rolled = UsageQuery(tenant, meter, window, aggregation, ("model",), {}, BASE, BASE + 30 * HOUR_NS)
                    # The same range, but given to the ledger path through a reference-attribute group-by.
                    raw = UsageQuery(
                        tenant, meter, window, aggregation, ("model", "trace_id"), {}, BASE, BASE + 30 * HOUR_NS
                    )
                    from_rollups = [
                        (b.start_ns, b.end_ns, b.group["model"], b.value) for b in core.query_usage(rolled).items
                    ]
                    from_ledger = [
                        (b.start_ns, b.end_ns, b.group["model"], b.value) for b in core.query_usage(raw).items
                    ]
                    assert from_rollups == from_ledger
        finally:
            core._store.db.dispose()
