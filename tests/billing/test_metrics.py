"""Billing's metrics: usage ingested by outcome and per tenant and meter, budget alerts, exhausted budgets and
month-to-date spend per tenant (a core on a real SQLite file); and a usage emitter's outbox as scraped: its backlog,
the age of its oldest event while billing is unreachable, deliveries and dead letters (a real billing server)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from prometheus_client import REGISTRY, generate_latest

from services.billing.client import BillingClient, UsageEmitter
from services.billing.core.model import UsageEvent
from services.billing.core.periods import HOUR_NS
from services.billing.core.service import BillingCore
from services.billing.metrics import BillingMetrics
from services.billing.store import BillingStore
from services.mesh.channels import create_channel
from services.mesh.config import MeshSettings, load_settings
from services.mesh.db import open_database
from services.mesh.metrics import Scrape
from tests.billing.conftest import NOW, Clock, RunningBilling
from tests.conftest import free_port

FAST = {"flush_interval_seconds": 0.05, "initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.3}


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_usage_alerts_and_exhausted_budgets(core: BillingCore) -> None:
    before = {
        "accepted": value("aidc_billing_usage_events_total", status="accepted"),
        "duplicate": value("aidc_billing_usage_events_total", status="duplicate"),
        "rejected": value("aidc_billing_usage_events_total", status="rejected"),
        "gpu": value("aidc_billing_usage_total", tenant="acme", meter="gpu_seconds"),
        "threshold": value("aidc_billing_budget_alerts_total", kind="threshold"),
    }
    core.set_budget("acme", 10_000_000, "USD", enforce=True)
    at = NOW - HOUR_NS
    first = UsageEvent("training", "j1", "acme", "gpu_seconds", "10800", at)  # 3 GPU-hours: 6.00
    core.record_usage([first, UsageEvent("training", "bad", "acme", "no_such_meter", "1", at)], allow_partial=True)
    core.record_usage([first])  # the same event again: a duplicate, counted once
    core.budgets.refresh_dirty()
    assert value("aidc_billing_usage_events_total", status="accepted") - before["accepted"] == 1
    assert value("aidc_billing_usage_events_total", status="duplicate") - before["duplicate"] == 1
    assert value("aidc_billing_usage_events_total", status="rejected") - before["rejected"] == 1
    assert value("aidc_billing_usage_total", tenant="acme", meter="gpu_seconds") - before["gpu"] == 10800
    assert value("aidc_billing_month_to_date_micros", tenant="acme") == 6_000_000
    assert value("aidc_billing_budget_exhausted", tenant="acme") == 0

    core.record_usage([UsageEvent("training", "j2", "acme", "gpu_seconds", "7200", at)])  # 10.00: used up
    core.budgets.refresh_dirty()
    assert value("aidc_billing_budget_exhausted", tenant="acme") == 1
    assert value("aidc_billing_month_to_date_micros", tenant="acme") == 10_000_000
    assert value("aidc_billing_budget_alerts_total", kind="threshold") - before["threshold"] == 2  # 80% and 100%


def test_metrics_off_record_nothing(tmp_path: Path) -> None:
    core = BillingCore(
        BillingStore(open_database(f"sqlite:///{tmp_path / 'b.db'}")), clock=Clock(), metrics=BillingMetrics(False)
    )
    core.start()
    before = value("aidc_billing_usage_events_total", status="accepted")
    core.record_usage([UsageEvent("training", "quiet", "initech", "gpu_seconds", "60", NOW - HOUR_NS)])
    assert value("aidc_billing_usage_events_total", status="accepted") == before
    assert value("aidc_billing_usage_total", tenant="initech", meter="gpu_seconds") == 0
    core._store.db.dispose()


async def test_outbox_backlog_lag_deliveries_and_dead_letters(billing: RunningBilling, tmp_path: Path) -> None:
    # Billing unreachable: events wait, and the oldest one's age grows.
    channel = create_channel(f"127.0.0.1:{free_port()}", load_settings(MeshSettings))
    nowhere = BillingClient(channel, timeout_seconds=0.5)

    def reported(source: str) -> int:
        return sum(
            1
            for labels, _ in Scrape(generate_latest(REGISTRY).decode()).series("aidc_usage_outbox_pending")
            if labels["source"] == source
        )

    already = reported("storage")  # emitters other tests of this process left open
    failures = value("aidc_usage_delivery_failures_total", source="storage")  # theirs too
    stuck = UsageEmitter(tmp_path / "stuck.db", nowhere, source="storage", **FAST)
    assert reported("storage") == already + 1
    await stuck.start()
    try:
        stuck.emit("storage_gib_hours", "1", tenant="acme", id="waits")
        emitted = time.monotonic()
        for _ in range(600):  # until this emitter tried and failed to deliver, however loaded the machine
            if value("aidc_usage_delivery_failures_total", source="storage") > failures:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.0, 1.2 - (time.monotonic() - emitted)))  # its event has waited over a second
        scraped = Scrape(generate_latest(REGISTRY).decode())
        assert scraped.value("aidc_usage_outbox_pending", source="storage") >= 1
        assert scraped.value("aidc_usage_outbox_oldest_seconds", source="storage") >= 1.0
        assert value("aidc_usage_delivery_failures_total", source="storage") > failures
    finally:
        await stuck.close(flush_timeout=0.1)
    assert reported("storage") == already  # closed: its figures are no longer reported

    delivered = value("aidc_usage_events_delivered_total", source="training", status="accepted")
    rejected = value("aidc_usage_events_delivered_total", source="training", status="rejected")
    emitter = UsageEmitter(tmp_path / "outbox.db", billing.client(), source="training", **FAST)
    await emitter.start()
    try:
        emitter.emit("gpu_seconds", "60", tenant="acme", id="ok", attributes={"gpu_type": "nvidia-l4"})
        emitter.emit("gpu_hours", "1", tenant="acme", id="bad-meter")
        await emitter.flush(timeout=10)
        figures = {name: number for name, _, number in emitter.figures()}
        assert figures["aidc_usage_outbox_pending"] == 0
        assert figures["aidc_usage_outbox_oldest_seconds"] == 0
        assert figures["aidc_usage_outbox_dead_letters"] == 1
        assert value("aidc_usage_events_delivered_total", source="training", status="accepted") - delivered == 1
        assert value("aidc_usage_events_delivered_total", source="training", status="rejected") - rejected == 1
    finally:
        await emitter.close()
