"""The typed client of the billing service, and the UsageEmitter other services meter usage with.

    emitter = UsageEmitter.for_service(settings, "serving")
    await emitter.start()
    emitter.emit("inference_requests", 1, tenant="acme", id=request_id, attributes={"model": "bert"})
    ...
    await emitter.close()          # one last flush attempt; whatever is left is sent after the next start

``emit`` only appends to a local durable outbox (see services.billing.outbox); a background sender delivers
batches with RecordUsage(allow_partial) and retries with exponential backoff while billing is unreachable.
Billing de-duplicates on (source, id), so redelivery after a crash or a lost answer never counts twice: choose
ids that identify the usage (a request id, "<job>:<minute>"), not random ones per attempt.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter

# The contract's meters and money notation, for callers such as the CLI (the core owns them; clients read them here).
from services.billing.core.meters import METER_NAMES, METERS
from services.billing.core.quantities import format_micros, parse_money
from services.billing.outbox import DeadLetter, PendingEvent, UsageOutbox
from services.gen.aidc.billing.v1 import billing_service_pb2 as pb
from services.gen.aidc.billing.v1 import billing_service_pb2_grpc
from services.gen.aidc.common.v1 import common_pb2
from services.mesh.channels import service_channel
from services.mesh.client import ServiceClient
from services.mesh.config import MeshSettings
from services.mesh.errors import AidcError, InvalidArgument
from services.mesh.identity import as_service, current_principal
from services.mesh.messages import timestamp
from services.mesh.metrics import Figure, ScrapedFigures, child, metrics_enabled

__all__ = [
    "BillingClient",
    "UsageEmitter",
    "EmitterStats",
    "usage_event",
    "money",
    "new_event_id",
    "METERS",
    "METER_NAMES",
    "format_micros",
    "parse_money",
]

log = logging.getLogger(__name__)


def money(micros: int, currency: str = "USD") -> common_pb2.Money:
    """A Money message (micros of the currency unit)."""
    return common_pb2.Money(micros=micros, currency=currency)


def _quantity_text(quantity: str | int | Decimal) -> str:
    if isinstance(quantity, bool) or isinstance(quantity, float):
        raise TypeError("usage quantities are exact: pass a decimal string, an int or a Decimal, never a float")
    if isinstance(quantity, Decimal):
        return format(quantity, "f")
    return str(quantity)


def usage_event(
    *,
    source: str,
    id: str,
    tenant: str,
    meter: str,
    quantity: str | int | Decimal,
    time_ns: int | None = None,
    attributes: Mapping[str, str] | None = None,
) -> pb.UsageEvent:
    """A UsageEvent message; time defaults to now."""
    at = time.time_ns() if time_ns is None else time_ns
    return pb.UsageEvent(
        id=id,
        source=source,
        tenant=tenant,
        meter=meter,
        quantity=_quantity_text(quantity),
        time=Timestamp(seconds=at // 10**9, nanos=at % 10**9),
        attributes=dict(attributes or {}),
    )


class BillingClient(ServiceClient):
    """Typed calls to BillingService; errors arrive as services.mesh.errors types."""

    def __init__(self, channel: grpc.aio.Channel, **kwargs: float) -> None:
        super().__init__(channel, **kwargs)  # type: ignore[arg-type]
        self.stub = billing_service_pb2_grpc.BillingServiceStub(channel)

    async def record_usage(
        self,
        events: Sequence[pb.UsageEvent],
        *,
        tenant: str = "",
        allow_partial: bool = False,
        timeout: float | None = None,
    ) -> list[pb.UsageEventResult]:
        request = pb.RecordUsageRequest(tenant=tenant, events=list(events), allow_partial=allow_partial)
        # Safe to retry: billing de-duplicates on (source, id).
        response = await self._unary(self.stub.RecordUsage, request, idempotent=True, timeout=timeout)
        return list(response.results)

    async def query_usage(
        self,
        meter: str,
        *,
        tenant: str = "",
        window: pb.Window.ValueType = pb.WINDOW_UNSPECIFIED,
        aggregation: pb.Aggregation.ValueType = pb.AGGREGATION_SUM,
        group_by: Sequence[str] = (),
        filter: Mapping[str, str] | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> pb.QueryUsageResponse:
        request = pb.QueryUsageRequest(
            tenant=tenant,
            meter=meter,
            window=window,
            aggregation=aggregation,
            group_by=list(group_by),
            filter=dict(filter or {}),
            start_time=timestamp(start),
            end_time=timestamp(end),
            page=common_pb2.PageRequest(page_size=page_size, page_token=page_token),
        )
        return await self._unary(self.stub.QueryUsage, request, idempotent=True)

    async def all_usage_buckets(self, meter: str, **kwargs: object) -> list[pb.UsageBucket]:
        """Every bucket of a query (all pages)."""
        buckets: list[pb.UsageBucket] = []
        token = ""
        while True:
            response = await self.query_usage(meter, page_size=1000, page_token=token, **kwargs)  # type: ignore[arg-type]
            buckets.extend(response.buckets)
            token = response.page.next_page_token
            if not token:
                return buckets

    async def get_usage_event(self, source: str, id: str, *, tenant: str = "") -> pb.GetUsageEventResponse:
        request = pb.GetUsageEventRequest(tenant=tenant, source=source, id=id)
        return await self._unary(self.stub.GetUsageEvent, request, idempotent=True)

    async def set_price_book(self, price_book: pb.PriceBook, *, tenant: str = "") -> pb.PriceBook:
        request = pb.SetPriceBookRequest(tenant=tenant, price_book=price_book)
        return (await self._unary(self.stub.SetPriceBook, request)).price_book

    async def get_price_book(self, *, tenant: str = "", at: datetime | None = None) -> pb.PriceBook:
        request = pb.GetPriceBookRequest(tenant=tenant, at_time=timestamp(at))
        return (await self._unary(self.stub.GetPriceBook, request, idempotent=True)).price_book

    async def set_tenant_plan(self, tenant: str, plan: str, start: datetime | None = None) -> pb.TenantPlan:
        request = pb.SetTenantPlanRequest(tenant=tenant, plan=plan, start_time=timestamp(start))
        return (await self._unary(self.stub.SetTenantPlan, request, idempotent=True)).tenant_plan

    async def check_budget(
        self, tenant: str, estimated_cost: common_pb2.Money | None = None, *, as_caller: bool = False
    ) -> pb.CheckBudgetResponse:
        """Asks as this service (see ``as_service``) unless ``as_caller``."""
        request = pb.CheckBudgetRequest(tenant=tenant, estimated_cost=estimated_cost)
        if as_caller:
            return await self._unary(self.stub.CheckBudget, request, idempotent=True)
        with as_service():
            return await self._unary(self.stub.CheckBudget, request, idempotent=True)

    async def set_budget(
        self,
        tenant: str,
        monthly_limit: common_pb2.Money | None,
        *,
        thresholds: Sequence[int] = (),
        enforce: bool = False,
        prepaid: bool | None = None,
    ) -> pb.Budget:
        """Sets ``tenant``'s budget; ``prepaid`` None leaves it as it is (only the platform may change it)."""
        request = pb.SetBudgetRequest(
            tenant=tenant,
            monthly_limit=monthly_limit,
            alert_threshold_percents=list(thresholds),
            enforce=enforce,
        )
        if prepaid is not None:
            request.prepaid = prepaid
        return (await self._unary(self.stub.SetBudget, request, idempotent=True)).budget

    async def grant_credit(
        self,
        tenant: str,
        grant_id: str,
        amount: common_pb2.Money,
        *,
        reason: str = "",
        expire: datetime | None = None,
    ) -> pb.GrantCreditResponse:
        request = pb.GrantCreditRequest(
            tenant=tenant, grant_id=grant_id, amount=amount, reason=reason, expire_time=timestamp(expire)
        )
        # Idempotent on grant_id.
        return await self._unary(self.stub.GrantCredit, request, idempotent=True)

    async def get_balance(self, tenant: str = "") -> pb.Balance:
        request = pb.GetBalanceRequest(tenant=tenant)
        return (await self._unary(self.stub.GetBalance, request, idempotent=True)).balance

    async def list_budget_alerts(
        self, tenant: str = "", *, since: datetime | None = None, page_size: int = 0
    ) -> list[pb.BudgetAlert]:
        request = pb.ListBudgetAlertsRequest(
            tenant=tenant, since_time=timestamp(since), page=common_pb2.PageRequest(page_size=page_size)
        )
        return list((await self._unary(self.stub.ListBudgetAlerts, request, idempotent=True)).alerts)

    async def create_invoice(
        self, tenant: str, *, period_start: datetime | None = None, period_end: datetime | None = None
    ) -> pb.Invoice:
        request = pb.CreateInvoiceRequest(
            tenant=tenant, period_start_time=timestamp(period_start), period_end_time=timestamp(period_end)
        )
        # Recomputing a draft is idempotent.
        return (await self._unary(self.stub.CreateInvoice, request, idempotent=True)).invoice

    async def get_invoice(self, tenant: str, invoice_id: str) -> pb.Invoice:
        request = pb.GetInvoiceRequest(tenant=tenant, invoice_id=invoice_id)
        return (await self._unary(self.stub.GetInvoice, request, idempotent=True)).invoice

    async def list_invoices(
        self, tenant: str, *, state: pb.InvoiceState.ValueType = pb.INVOICE_STATE_UNSPECIFIED, page_size: int = 0
    ) -> list[pb.Invoice]:
        request = pb.ListInvoicesRequest(tenant=tenant, state=state, page=common_pb2.PageRequest(page_size=page_size))
        return list((await self._unary(self.stub.ListInvoices, request, idempotent=True)).invoices)

    async def finalize_invoice(self, tenant: str, invoice_id: str) -> pb.Invoice:
        request = pb.FinalizeInvoiceRequest(tenant=tenant, invoice_id=invoice_id)
        # Finalizing a finalized invoice returns it unchanged.
        return (await self._unary(self.stub.FinalizeInvoice, request, idempotent=True)).invoice

    async def export_invoice(
        self, tenant: str, invoice_id: str, format: pb.ExportFormat.ValueType
    ) -> pb.ExportInvoiceResponse:
        request = pb.ExportInvoiceRequest(tenant=tenant, invoice_id=invoice_id, format=format)
        return await self._unary(self.stub.ExportInvoice, request, idempotent=True)


@dataclass
class EmitterStats:
    """What the sender has seen since start."""

    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    failures: int = 0


_DELIVERY_STATUSES = {
    pb.USAGE_EVENT_STATUS_ACCEPTED: "accepted",
    pb.USAGE_EVENT_STATUS_DUPLICATE: "duplicate",
    pb.USAGE_EVENT_STATUS_REJECTED: "rejected",
}
DELIVERED = Counter(
    "aidc_usage_events_delivered",
    "Usage events this service's outbox delivered to billing, by billing's answer (rejected ones are dead letters).",
    ["source", "status"],
)
DELIVERY_FAILURES = Counter(
    "aidc_usage_delivery_failures", "Failed attempts to deliver a batch of usage events to billing.", ["source"]
)
#: Read from the outbox file when scraped: how far behind billing is, and what it refused.
BACKLOG = ScrapedFigures(
    ("gauge", "aidc_usage_outbox_pending", "Usage events waiting in this service's outbox for billing.", ("source",)),
    (
        "gauge",
        "aidc_usage_outbox_oldest_seconds",
        "Age of the oldest usage event waiting in the outbox (0 when it is empty): billing's lag for this service.",
        ("source",),
    ),
    (
        "gauge",
        "aidc_usage_outbox_dead_letters",
        "Usage events billing rejected, kept in the outbox's dead-letter table for an operator.",
        ("source",),
    ),
)


class UsageEmitter:
    """Meters usage through a local durable outbox, delivered to billing in batches with retries."""

    def __init__(
        self,
        outbox_path: Path,
        client: BillingClient,
        *,
        source: str,
        batch_size: int = 500,
        flush_interval_seconds: float = 0.5,
        initial_backoff_seconds: float = 0.2,
        max_backoff_seconds: float = 30.0,
        rpc_timeout_seconds: float = 10.0,
        metrics: bool = True,
    ) -> None:
        if not 1 <= batch_size <= 1000:
            raise ValueError("batch_size must be between 1 and 1000 (RecordUsage's limit)")
        self.outbox = UsageOutbox(outbox_path)
        self._delivered = {
            status: child(metrics, DELIVERED, source, name) for status, name in _DELIVERY_STATUSES.items()
        }
        self._failures = child(metrics, DELIVERY_FAILURES, source)
        self._detach_backlog = BACKLOG.attach(self.figures) if metrics else (lambda: None)
        self.client = client
        self.source = source
        self.stats = EmitterStats()
        self._batch_size = batch_size
        self._interval = flush_interval_seconds
        self._initial_backoff = initial_backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._rpc_timeout = rpc_timeout_seconds
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsent = 0

    @classmethod
    def for_service(cls, settings: MeshSettings, service: str, **kwargs: float) -> UsageEmitter:
        """The emitter of a mesh service: outbox at <data_dir>/<service>/usage-outbox.db, calls as the service."""
        channel = service_channel("billing", settings, identity=service)
        path = settings.data_dir / service / "usage-outbox.db"
        return cls(
            path,
            BillingClient(channel),
            source=service,
            metrics=metrics_enabled(settings),
            **kwargs,  # type: ignore[arg-type]
        )

    def figures(self) -> list[Figure]:
        """What a scrape reports about this emitter's outbox: events waiting, the oldest one's age, dead letters."""
        pending, oldest, dead = self.outbox.backlog()
        age = max(time.time() - oldest, 0.0) if oldest is not None else 0.0
        labels = (self.source,)
        return [
            ("aidc_usage_outbox_pending", labels, pending),
            ("aidc_usage_outbox_oldest_seconds", labels, age),
            ("aidc_usage_outbox_dead_letters", labels, dead),
        ]

    # -- emitting ----------------------------------------------------------------------------------------

    def emit(
        self,
        meter: str,
        quantity: str | int | Decimal,
        *,
        tenant: str,
        id: str,
        time_ns: int | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> None:
        """Records one usage event durably in the outbox (a local write; never waits for billing)."""
        self.emit_events(
            [
                usage_event(
                    source=self.source,
                    id=id,
                    tenant=tenant,
                    meter=meter,
                    quantity=quantity,
                    time_ns=time_ns,
                    attributes=attributes,
                )
            ]
        )

    def emit_events(self, events: Sequence[pb.UsageEvent]) -> None:
        """Records several events in one local transaction."""
        for event in events:
            if event.source != self.source:
                raise InvalidArgument(f"this emitter sends as source {self.source!r}, not {event.source!r}")
        self.outbox.add([event.SerializeToString() for event in events])
        self._unsent += len(events)
        if self._unsent >= self._batch_size:  # a full batch is waiting: send now rather than at the next tick
            self._unsent = 0
            self._wake.set()

    def pending(self) -> int:
        """Events not yet acknowledged by billing."""
        return self.outbox.pending()

    def dead_letters(self) -> list[DeadLetter]:
        """Events billing rejected, with the reason (kept, never silently dropped)."""
        return self.outbox.dead_letters()

    # -- sending -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"usage-emitter-{self.source}")

    async def flush(self, timeout: float | None = None) -> None:
        """Waits until the outbox has been empty since this call (raises TimeoutError after ``timeout``)."""
        if self._task is None:
            raise RuntimeError("start() the emitter first")
        self._drained.clear()
        self._wake.set()
        await asyncio.wait_for(self._drained.wait(), timeout)

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Tries to flush for ``flush_timeout`` seconds, then stops; unsent events stay in the outbox."""
        if self._task is not None:
            try:
                await self.flush(flush_timeout)
            except TimeoutError:
                log.warning("usage outbox holds %d unsent events; they are sent after the next start", self.pending())
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._detach_backlog()
        await self.client.close()
        self.outbox.close()

    async def _run(self) -> None:
        current_principal.set(None)  # this task calls as the service itself, whichever request started it
        backoff = self._initial_backoff
        while True:
            batch = await asyncio.to_thread(self.outbox.peek, self._batch_size)
            if not batch:
                self._drained.set()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self._interval)
                except TimeoutError:
                    pass
                continue
            try:
                await self._send(batch)
                backoff = self._initial_backoff
            except AidcError as exc:
                self.stats.failures += 1
                self._failures.inc()
                delay = backoff * (0.5 + random.random())  # jitter: emitters don't retry in lockstep
                log.warning("usage delivery failed (%s: %s); retrying in %.1f s", exc.code.name, exc.message, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self._max_backoff)

    async def _send(self, pending: Sequence[PendingEvent]) -> None:
        events = [pb.UsageEvent.FromString(item.payload) for item in pending]
        results = await self.client.record_usage(events, allow_partial=True, timeout=self._rpc_timeout)
        done: list[int] = []
        dead: list[DeadLetter] = []
        for item, result in zip(pending, results, strict=True):
            if result.status == pb.USAGE_EVENT_STATUS_REJECTED:
                dead.append(DeadLetter(item.seq, item.payload, result.reason))
                log.error("billing rejected usage event %s/%s: %s", result.source, result.id, result.reason)
            else:
                done.append(item.seq)
        await asyncio.to_thread(self.outbox.settle, done, dead)
        self.stats.batches += 1
        self.stats.accepted += sum(r.status == pb.USAGE_EVENT_STATUS_ACCEPTED for r in results)
        self.stats.duplicates += sum(r.status == pb.USAGE_EVENT_STATUS_DUPLICATE for r in results)
        self.stats.rejected += len(dead)
        for result in results:
            counter = self._delivered.get(result.status)
            if counter is not None:
                counter.inc()


def new_event_id(at_ns: int | None = None) -> str:
    """A fresh time-ordered event id (UUIDv7, RFC 9562), for usage without a natural id. Billing keys its dedup
    index by the embedded time, so such ids ingest faster than random ones."""
    millis = (time.time_ns() if at_ns is None else at_ns) // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & (2**48 - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | rand & (2**62 - 1)
    return str(uuid.UUID(int=value))
