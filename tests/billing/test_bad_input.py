"""Bad input, through the real gRPC server with its interceptors: INVALID_ARGUMENT with a message naming the
problem, and nothing recorded (every billing table is compared before and after, row by row)."""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, select

from services.billing.client import BillingClient, money, usage_event
from services.billing.schema import metadata
from services.gen.aidc.billing.v1 import billing_service_pb2 as pb
from services.gen.aidc.common.v1 import common_pb2
from services.mesh import errors
from tests.billing.conftest import RunningBilling

HOUR = 3600 * 10**9


def _event(id: str = "ok-1", **overrides: Any) -> pb.UsageEvent:
    fields: dict[str, Any] = {
        "source": "serving",
        "id": id,
        "tenant": "acme",
        "meter": "inference_requests",
        "quantity": "1",
        "attributes": {"model": "bert"},
    }
    fields.update(overrides)
    return usage_event(**fields)


def _record(*bad: pb.UsageEvent) -> Callable[[BillingClient], Awaitable[Any]]:
    """A batch whose first event is fine: the whole batch must fail, the good event included."""
    return lambda c: c.record_usage([_event("good-in-bad-batch"), *bad])


def _book(currency: str = "USD", price_currency: str = "USD", **overrides: Any) -> pb.PriceBook:
    """A complete one-plan book (flat prices), with overrides applied to its on-demand plan."""
    prices = [
        pb.MeterPrice(meter=m, tiers=[pb.PriceTier(unit_price=money(1000, price_currency))])
        for m in (
            "gpu_seconds",
            "cpu_core_seconds",
            "memory_gib_seconds",
            "storage_gib_hours",
            "inference_requests",
            "inference_compute_ms",
        )
    ]
    plan = pb.Plan(name="on-demand", kind=pb.PLAN_KIND_ON_DEMAND, prices=overrides.pop("prices", prices))
    next_hour = (time.time_ns() // HOUR + 1) * HOUR
    effective = overrides.pop("effective_ns", next_hour)
    stamp = datetime.fromtimestamp(effective / 1e9, UTC)
    book = pb.PriceBook(currency=currency, plans=[plan])
    book.effective_time.FromDatetime(stamp)
    return book


def _tiers(*bounds: str) -> list[pb.MeterPrice]:
    tiers = [pb.PriceTier(up_to=b, unit_price=money(1000)) for b in bounds] + [pb.PriceTier(unit_price=money(500))]
    book = _book()
    prices = list(book.plans[0].prices)
    prices[4] = pb.MeterPrice(meter="inference_requests", tiers=tiers)
    return prices


_LAST_DAY = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)

BAD_INPUT: list[tuple[str, Callable[[BillingClient], Awaitable[Any]], str]] = [
    ("negative quantity", _record(_event(quantity="-5")), "negative"),
    ("unknown meter", _record(_event(meter="gpu_hours")), "unknown meter 'gpu_hours'"),
    ("malformed decimal (exponent)", _record(_event(quantity="1e3")), "not a plain decimal"),
    ("malformed decimal (comma)", _record(_event(quantity="12,5")), "not a plain decimal"),
    ("malformed decimal (text)", _record(_event(quantity="lots")), "not a plain decimal"),
    ("too many fractional digits", _record(_event(quantity="0.0000000001")), "more than 9 fractional"),
    ("quantity too large", _record(_event(quantity="1000000000")), "too large"),
    ("event far in the future", _record(_event(time_ns=time.time_ns() + 24 * HOUR)), "in the future"),
    ("event without a time", _record(_event(time_ns=0)), "time is required"),
    ("event without an id", _record(_event(id="")), "id is required"),
    ("bad source", _record(_event(source="Serving!")), "source"),
    ("bad attribute key", _record(_event(attributes={"Model Name": "x"})), "attribute key"),
    ("control character in attribute", _record(_event(attributes={"model": "a\x00b"})), "control"),
    (
        "event of another tenant than the request's",
        lambda c: c.record_usage([_event(), _event("x", tenant="globex")], tenant="acme"),
        "differs from the request's tenant",
    ),
    ("batch too large", lambda c: c.record_usage([_event(f"e{i}") for i in range(1001)]), "at most 1000"),
    (
        "credit in the wrong currency",
        lambda c: c.grant_credit("acme", "g-eur", money(5_000_000, "EUR")),
        "platform currency USD",
    ),
    ("negative credit", lambda c: c.grant_credit("acme", "g-neg", money(-5, "USD")), "positive"),
    (
        "budget in the wrong currency",
        lambda c: c.set_budget("acme", money(100_000_000, "EUR"), enforce=True),
        "platform currency USD",
    ),
    ("negative budget", lambda c: c.set_budget("acme", money(-1, "USD")), "positive"),
    ("threshold out of range", lambda c: c.set_budget("acme", money(1, "USD"), thresholds=[0]), "percentages"),
    (
        "budget check in the wrong currency",
        lambda c: c.check_budget("acme", money(1_000_000, "JPY"), as_caller=True),
        "platform currency USD",
    ),
    ("price book in the wrong currency", lambda c: c.set_price_book(_book("EUR", "EUR")), "platform currency"),
    ("tier price in the wrong currency", lambda c: c.set_price_book(_book("USD", "EUR")), "'EUR'"),
    (
        "price book without a catch-all price",
        lambda c: c.set_price_book(_book(prices=_book().plans[0].prices[:5])),
        "catch-all",
    ),
    (
        "tiers that do not increase",
        lambda c: c.set_price_book(_book(prices=_tiers("100", "50"))),
        "must increase",
    ),
    ("tier bound not a decimal", lambda c: c.set_price_book(_book(prices=_tiers("1e9"))), "up_to"),
    (
        "price book effective in the past",
        lambda c: c.set_price_book(_book(effective_ns=(time.time_ns() // HOUR - 2) * HOUR)),
        "past",
    ),
    (
        "plan change mid-month",
        lambda c: c.set_tenant_plan("acme", "committed-10k", datetime(2031, 1, 15, tzinfo=UTC)),
        "first instant of a calendar month",
    ),
    ("unknown plan", lambda c: c.set_tenant_plan("acme", "platinum"), "no plan 'platinum'"),
    (
        "invoice period not a month",
        lambda c: c.create_invoice("acme", period_start=_LAST_DAY.replace(day=2)),
        "first instant of a calendar month",
    ),
    (
        "invoice period not over",
        lambda c: c.create_invoice(
            "acme", period_start=datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        ),
        "has not ended",
    ),
    ("query of an unknown meter", lambda c: c.query_usage("gpu_hours", tenant="acme"), "unknown meter"),
    (
        "query range backwards",
        lambda c: c.query_usage(
            "gpu_seconds", tenant="acme", start=datetime(2025, 2, 1, tzinfo=UTC), end=datetime(2025, 1, 1, tzinfo=UTC)
        ),
        "start_time < end_time",
    ),
    ("bad page token", lambda c: c.list_invoices("acme", page_size=-1), "page_size"),
    # Found by fuzzing (the same parsing as serving's and the scheduler's): an offset past SQL's integers.
    (
        "forged page token",
        lambda c: c._unary(
            c.stub.ListInvoices,
            pb.ListInvoicesRequest(
                tenant="acme",
                page=common_pb2.PageRequest(page_token=base64.urlsafe_b64encode(b"o:9223372036854775808").decode()),
            ),
        ),
        "page_token",
    ),
]


def _rows(billing: RunningBilling) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every billing table."""
    engine = create_engine(billing.settings.database_url_for("billing"))
    try:
        with engine.connect() as conn:
            return {name: sorted(map(tuple, conn.execute(select(table)))) for name, table in metadata.tables.items()}
    finally:
        engine.dispose()


@pytest.mark.parametrize(("case", "call", "fragment"), BAD_INPUT, ids=[case for case, _, _ in BAD_INPUT])
async def test_bad_input_is_invalid_argument_and_records_nothing(
    billing: RunningBilling, case: str, call: Callable[[BillingClient], Awaitable[Any]], fragment: str
) -> None:
    client = billing.client()
    # Some state for a bad request to disturb: an event, a budget, a grant.
    await client.record_usage([_event("before")])
    await client.set_budget("acme", money(50_000_000), enforce=True)
    await client.grant_credit("acme", "welcome", money(10_000_000))
    before = _rows(billing)
    with pytest.raises(errors.InvalidArgument) as raised:
        await call(client)
    assert fragment in raised.value.message, raised.value.message
    assert _rows(billing) == before, f"{case} changed the database"
    await client.close()


async def test_the_wire_status_is_invalid_argument(billing: RunningBilling) -> None:
    """The typed error above comes from the real status code on the wire."""
    async with grpc.aio.insecure_channel(billing.address) as channel:
        call = channel.unary_unary(
            "/aidc.billing.v1.BillingService/RecordUsage",
            request_serializer=pb.RecordUsageRequest.SerializeToString,
            response_deserializer=pb.RecordUsageResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(
                pb.RecordUsageRequest(events=[_event(quantity="-1")]),
                metadata=(("authorization", f"Bearer {billing.admin_token}"),),
            )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[0] (serving/ok-1): quantity '-1' is negative" in (raised.value.details() or "")


async def test_allow_partial_rejects_only_the_bad_events(billing: RunningBilling) -> None:
    client = billing.client()
    results = await client.record_usage(
        [_event("a"), _event("b", quantity="-1"), _event("c", meter="nope"), _event("d")], allow_partial=True
    )
    assert [r.status for r in results] == [
        pb.USAGE_EVENT_STATUS_ACCEPTED,
        pb.USAGE_EVENT_STATUS_REJECTED,
        pb.USAGE_EVENT_STATUS_REJECTED,
        pb.USAGE_EVENT_STATUS_ACCEPTED,
    ]
    assert "negative" in results[1].reason and "unknown meter" in results[2].reason
    count = await client.query_usage(
        "inference_requests", tenant="acme", aggregation=pb.AGGREGATION_COUNT, start=datetime(2020, 1, 1, tzinfo=UTC)
    )
    assert [b.value for b in count.buckets] == ["2"]
    await client.close()
