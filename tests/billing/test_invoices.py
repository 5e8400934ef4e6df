"""Invoices through the real service: totals equal the sum of their lines and an independent computation from
the raw events; finalized invoices are immutable; credit, exports, and per-event cost attribution."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
from google.protobuf import json_format

from services.billing.client import BillingClient, money, usage_event
from services.gen.aidc.billing.v1 import billing_service_pb2 as pb
from services.mesh import errors
from tests.billing.conftest import RunningBilling
from tests.billing.pricing_oracle import RawEvent, expected_lines


def _last_month() -> datetime:
    this_month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (this_month - timedelta(days=1)).replace(day=1)


def _usage(start: datetime) -> list[pb.UsageEvent]:
    """A month of varied usage: GPU types with their own prices and a catch-all, tiers crossed exactly at
    bounds (so each event falls on one line), a free quantity, decimals that need rounding."""
    events = []

    def add(n: int, meter: str, quantity: str, hours: int, **attributes: str) -> None:
        at = start + timedelta(hours=hours, seconds=n)
        trace = f"{n:032x}"
        events.append(
            usage_event(
                source="serving" if meter.startswith("inference") else "training",
                id=f"{meter}-{n}",
                tenant="acme",
                meter=meter,
                quantity=quantity,
                time_ns=int(at.timestamp()) * 10**9,
                attributes={**attributes, "trace_id": trace, "request_id": f"r{n}"},
            )
        )

    for n in range(6):  # 3,000,000 requests: 1,000,000 free, 2,000,000 at 0.20 per million
        add(n, "inference_requests", "500000", hours=n * 10, model="bert")
    for n in range(4):
        add(100 + n, "inference_compute_ms", "1234567.891", hours=n * 30, model="bert")
    for n in range(3):
        add(200 + n, "gpu_seconds", "3600.333333333", hours=n * 50, gpu_type="nvidia-a100-80gb", job="j1")
    add(300, "gpu_seconds", "7200", hours=400, gpu_type="amd-mi300x", job="j2")  # no own price: the catch-all
    for n in range(3):  # crosses the 36,000 free core-seconds exactly at the bound
        add(400 + n, "cpu_core_seconds", "18000", hours=n * 100, job="j1")
    add(500, "storage_gib_hours", "0.1", hours=600, dataset="d1")
    return events


def _micros(message: pb.InvoiceLine) -> int:
    return message.amount.micros


async def test_invoice_equals_its_lines_and_an_independent_computation(billing: RunningBilling) -> None:
    client = billing.client()
    start = _last_month()
    events = _usage(start)
    results = await client.record_usage(events)
    assert {r.status for r in results} == {pb.USAGE_EVENT_STATUS_ACCEPTED}

    invoice = await client.create_invoice("acme")  # default period: the previous month
    assert invoice.period_start_time.ToDatetime(UTC) == start
    assert invoice.state == pb.INVOICE_STATE_DRAFT and invoice.currency == "USD" and invoice.plan == "on-demand"

    # Totals are sums of the rounded lines.
    assert invoice.total.micros == sum(_micros(line) for line in invoice.lines)
    assert invoice.subtotal.micros + invoice.credits_applied.micros == invoice.total.micros

    # An independent computation from the raw events and the published price book.
    book = await client.get_price_book(tenant="acme", at=start)
    raw = [RawEvent(e.meter, e.quantity, dict(e.attributes)) for e in events]
    expected = expected_lines(book, "on-demand", raw)
    got = {
        (line.meter, tuple(sorted(line.match.items())), line.tier_index): (Fraction(line.quantity), line.amount.micros)
        for line in invoice.lines
    }
    assert got == expected
    assert invoice.total.micros == sum(amount for _, amount in expected.values())
    assert invoice.total.micros > 0

    # Every event is counted on exactly one line.
    per_meter = Counter(e.meter for e in events)
    counted: Counter[str] = Counter()
    for line in invoice.lines:
        counted[line.meter] += line.event_count
    assert counted == per_meter
    await client.close()


async def test_each_event_leads_to_its_line_and_trace(billing: RunningBilling) -> None:
    client = billing.client()
    events = _usage(_last_month())
    await client.record_usage(events)
    before = await client.get_usage_event("serving", events[0].id, tenant="acme")
    assert before.invoice_id == "" and before.trace_id == events[0].attributes["trace_id"]

    invoice = await client.create_invoice("acme")
    lines = {line.line_id: line for line in invoice.lines}
    attributed = 0
    for event in events:
        found = await client.get_usage_event(event.source, event.id, tenant="acme")
        assert found.event == event
        assert found.trace_id == event.attributes["trace_id"]
        assert found.invoice_id == invoice.invoice_id
        line = lines[found.line_id]
        assert line.meter == event.meter
        assert found.attributed_cost.currency == "USD"
        attributed += found.attributed_cost.micros
    # The first two 500,000-request events fill the free million; the rest are charged.
    first = await client.get_usage_event("serving", "inference_requests-0", tenant="acme")
    third = await client.get_usage_event("serving", "inference_requests-2", tenant="acme")
    assert lines[first.line_id].tier_index == -1 and first.attributed_cost.micros == 0
    assert lines[third.line_id].tier_index == 0 and third.attributed_cost.micros == 100_000
    # The third compute event crosses the free hour: it starts on the free line and carries its paid part.
    crossing = await client.get_usage_event("serving", "inference_compute_ms-102", tenant="acme")
    assert lines[crossing.line_id].tier_index == -1
    paid_part = Fraction("1234567.891") * 3 - 3_600_000
    assert crossing.attributed_cost.micros == round(paid_part / 1000 * 500)
    # Events' costs add up to the invoice, up to one micro of rounding per event.
    assert abs(attributed - invoice.total.micros) <= len(events)
    with pytest.raises(errors.NotFound):
        await client.get_usage_event("serving", events[0].id, tenant="globex")
    await client.close()


async def test_finalized_invoices_are_immutable_and_take_credit(billing: RunningBilling) -> None:
    client = billing.client()
    start = _last_month()
    await client.record_usage(_usage(start))
    await client.grant_credit("acme", "welcome", money(5_000_000), reason="welcome credit")
    draft = await client.create_invoice("acme")
    assert draft.credits_applied.micros == 0

    final = await client.finalize_invoice("acme", draft.invoice_id)
    assert final.state == pb.INVOICE_STATE_FINALIZED and final.HasField("finalize_time")
    credit = [line for line in final.lines if line.kind == pb.INVOICE_LINE_KIND_CREDIT]
    assert [line.amount.micros for line in credit] == [-min(5_000_000, draft.subtotal.micros)]
    assert final.total.micros == final.subtotal.micros + final.credits_applied.micros
    assert final.total.micros == sum(line.amount.micros for line in final.lines)
    balance = await client.get_balance("acme")
    assert balance.credit_balance.micros == 5_000_000 - min(5_000_000, draft.subtotal.micros)

    # Immutable: no recompute, late usage for the month is rejected, finalizing again changes nothing.
    with pytest.raises(errors.AlreadyExists):
        await client.create_invoice("acme")
    late = await client.record_usage(
        [
            usage_event(
                source="serving",
                id="late-1",
                tenant="acme",
                meter="gpu_seconds",
                quantity="100",
                time_ns=int((start + timedelta(days=3)).timestamp()) * 10**9,
            )
        ]
    )
    assert late[0].status == pb.USAGE_EVENT_STATUS_REJECTED and "finalized" in late[0].reason
    assert await client.finalize_invoice("acme", draft.invoice_id) == final
    assert await client.get_invoice("acme", draft.invoice_id) == final
    listed = await client.list_invoices("acme", state=pb.INVOICE_STATE_FINALIZED)
    assert [i.invoice_id for i in listed] == [final.invoice_id] and not listed[0].lines
    await client.close()


async def test_exports_carry_the_same_lines_and_totals(billing: RunningBilling) -> None:
    client = billing.client()
    await client.record_usage(_usage(_last_month()))
    invoice = await client.create_invoice("acme")

    exported = await client.export_invoice("acme", invoice.invoice_id, pb.EXPORT_FORMAT_JSON)
    assert exported.content_type == "application/json" and exported.filename.endswith(".json")
    assert json_format.Parse(exported.content.decode(), pb.Invoice()) == invoice
    assert json.loads(exported.content)["invoiceId"] == invoice.invoice_id

    exported = await client.export_invoice("acme", invoice.invoice_id, pb.EXPORT_FORMAT_CSV)
    assert exported.content_type == "text/csv" and exported.filename.startswith("acme-")
    rows = list(csv.DictReader(io.StringIO(exported.content.decode())))
    lines = [row for row in rows if row["kind"]]
    totals = {row["line_id"]: row["amount"] for row in rows if not row["kind"]}
    assert [row["line_id"] for row in lines] == [line.line_id for line in invoice.lines]
    for row, line in zip(lines, invoice.lines, strict=True):
        assert Fraction(row["amount"]) * 10**6 == line.amount.micros
        assert row["quantity"] == line.quantity and row["currency"] == "USD"
    assert Fraction(totals["total"]) * 10**6 == invoice.total.micros
    assert sum(Fraction(row["amount"]) for row in lines) == Fraction(totals["total"])
    await client.close()


async def test_invoice_of_an_idle_tenant_is_empty(billing: RunningBilling) -> None:
    client: BillingClient = billing.client()
    invoice = await client.create_invoice("globex")
    assert list(invoice.lines) == [] and invoice.total.micros == 0
    await client.close()
