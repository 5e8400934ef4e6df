"""The billing core behaves the same on PostgreSQL as on its SQLite default, chosen only by the database URL:
idempotent ingest (the driver-level SQL of the hot path included), conflicts, rollups vs ledger, invoices,
finalization and attribution. Each test runs on both backends (PostgreSQL: tests/postgres.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.billing.client import new_event_id
from services.billing.core.model import EventStatus, InvoiceState, UsageEvent, UsageQuery
from services.billing.core.periods import HOUR_NS
from services.billing.core.service import BillingCore, BillingPolicy
from services.billing.store import BillingStore
from services.mesh.db import open_database
from tests.billing.conftest import NOW, Clock
from tests.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

FEB = NOW - 9 * 24 * HOUR_NS - 12 * HOUR_NS - 28 * 24 * HOUR_NS  # 2025-02-01 00:00 UTC


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_core(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BillingCore]:
    url = (
        f"sqlite:///{tmp_path / 'billing.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    )
    clock = Clock()
    core = BillingCore(BillingStore(open_database(url)), BillingPolicy(invoice_grace_seconds=0), clock=clock)
    core.start()
    core.start()  # a restart on an existing database changes nothing
    yield core
    core._store.db.dispose()


def test_ingest_invoice_and_attribution_agree_on_both_backends(backend_core: BillingCore) -> None:
    core = backend_core
    events = [
        UsageEvent(
            "serving",
            new_event_id(FEB + i * HOUR_NS) if i % 2 else f"req-{i}",
            "acme",
            "inference_requests",
            "400000",
            FEB + i * HOUR_NS,
            {"model": "bert", "request_id": f"r{i}"},
        )
        for i in range(5)
    ]
    first = core.record_usage(events)
    assert [r.status for r in first] == [EventStatus.ACCEPTED] * 5
    again = core.record_usage([*events[:2], events[2]._replace(quantity="1")])
    assert [r.status for r in again] == [EventStatus.DUPLICATE, EventStatus.DUPLICATE, EventStatus.REJECTED]

    rolled = core.query_usage(UsageQuery("acme", "inference_requests", start_ns=FEB, end_ns=FEB + 24 * HOUR_NS))
    raw = core.query_usage(UsageQuery("acme", "inference_requests", start_ns=FEB + 1, end_ns=FEB + 24 * HOUR_NS))
    assert [b.value for b in rolled.items] == ["2000000"]
    assert [b.value for b in raw.items] == ["1600000"]  # the first event is at FEB exactly

    invoice = core.create_invoice("acme", FEB)
    assert [(line.tier_index, line.event_count, line.amount_micros) for line in invoice.lines] == [
        (-1, 3, 0),
        (0, 2, 200_000),
    ]
    costs = [core.usage_event("acme", e.source, e.id).cost_micros for e in events]
    assert costs == [0, 0, 40_000, 80_000, 80_000]

    final = core.finalize_invoice("acme", invoice.invoice_id)
    assert final.state is InvoiceState.FINALIZED and final.total_micros == 200_000
    late = core.record_usage([UsageEvent("serving", "late", "acme", "inference_requests", "1", FEB + HOUR_NS)])
    assert late[0].status is EventStatus.REJECTED and "finalized" in late[0].reason
