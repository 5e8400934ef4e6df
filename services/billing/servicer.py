"""BillingService RPCs: translation between protobuf messages and BillingCore calls, nothing else.

Core calls touch the database, so each runs in a worker thread (the event loop keeps serving).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from grpc.aio import ServicerContext
from opentelemetry import trace

from services.billing.core.model import (
    Aggregation,
    AlertKind,
    Balance,
    Budget,
    BudgetAlert,
    EventStatus,
    Invoice,
    InvoiceLine,
    InvoiceState,
    LineKind,
    MeterPrice,
    Plan,
    PlanKind,
    PriceBook,
    PriceTier,
    RecordedEvent,
    UsageEvent,
    UsageQuery,
    Window,
)
from services.billing.core.periods import month_label
from services.billing.core.quantities import NANOS, format_nanos, parse_decimal
from services.billing.core.service import BillingCore
from services.gen.aidc.billing.v1 import billing_service_pb2 as pb
from services.gen.aidc.billing.v1 import billing_service_pb2_grpc
from services.gen.aidc.common.v1 import common_pb2
from services.mesh.authz import PermissionChecker
from services.mesh.errors import InvalidArgument
from services.mesh.identity import PLATFORM_TENANT, require_principal

__all__ = ["BillingServicer", "invoice_message", "event_from_message", "event_message"]

_T = TypeVar("_T")

_STATUS = {
    EventStatus.ACCEPTED: pb.USAGE_EVENT_STATUS_ACCEPTED,
    EventStatus.DUPLICATE: pb.USAGE_EVENT_STATUS_DUPLICATE,
    EventStatus.REJECTED: pb.USAGE_EVENT_STATUS_REJECTED,
}
_WINDOW = {
    pb.WINDOW_UNSPECIFIED: Window.WHOLE,
    pb.WINDOW_HOUR: Window.HOUR,
    pb.WINDOW_DAY: Window.DAY,
    pb.WINDOW_MONTH: Window.MONTH,
}
_AGGREGATION = {
    pb.AGGREGATION_UNSPECIFIED: Aggregation.SUM,
    pb.AGGREGATION_SUM: Aggregation.SUM,
    pb.AGGREGATION_COUNT: Aggregation.COUNT,
    pb.AGGREGATION_MAX: Aggregation.MAX,
}
_PLAN_KIND = {pb.PLAN_KIND_ON_DEMAND: PlanKind.ON_DEMAND, pb.PLAN_KIND_COMMITTED: PlanKind.COMMITTED}
_PLAN_KIND_PB = {v: k for k, v in _PLAN_KIND.items()}
_INVOICE_STATE = {
    InvoiceState.DRAFT: pb.INVOICE_STATE_DRAFT,
    InvoiceState.FINALIZED: pb.INVOICE_STATE_FINALIZED,
}
_INVOICE_STATE_FILTER = {
    pb.INVOICE_STATE_UNSPECIFIED: None,
    pb.INVOICE_STATE_DRAFT: InvoiceState.DRAFT,
    pb.INVOICE_STATE_FINALIZED: InvoiceState.FINALIZED,
}
_LINE_KIND = {
    LineKind.USAGE: pb.INVOICE_LINE_KIND_USAGE,
    LineKind.COMMITMENT_SHORTFALL: pb.INVOICE_LINE_KIND_COMMITMENT_SHORTFALL,
    LineKind.CREDIT: pb.INVOICE_LINE_KIND_CREDIT,
}
_ALERT_KIND = {
    AlertKind.THRESHOLD: pb.BUDGET_ALERT_KIND_THRESHOLD,
    AlertKind.CREDIT_EXHAUSTED: pb.BUDGET_ALERT_KIND_CREDIT_EXHAUSTED,
}


def _ns(stamp: Timestamp) -> int:
    return stamp.seconds * NANOS + stamp.nanos


def _ns_or_none(message: Any, name: str) -> int | None:
    return _ns(getattr(message, name)) if message.HasField(name) else None


def _ts(ns: int | None) -> Timestamp | None:
    if ns is None:
        return None
    seconds, nanos = divmod(ns, NANOS)
    return Timestamp(seconds=seconds, nanos=nanos)


def _money(micros: int | None, currency: str) -> common_pb2.Money | None:
    return None if micros is None else common_pb2.Money(micros=micros, currency=currency)


def _scope(tenant: str) -> str:
    """The request's tenant; when empty, the caller's own ("" for platform callers: every tenant)."""
    if tenant:
        return tenant
    caller = require_principal()
    return "" if caller.tenant == PLATFORM_TENANT else caller.tenant


def event_from_message(event: pb.UsageEvent) -> UsageEvent:
    return UsageEvent(
        source=event.source,
        id=event.id,
        tenant=event.tenant,
        meter=event.meter,
        quantity=event.quantity,
        time_ns=_ns(event.time),
        attributes=dict(event.attributes),
    )


def event_message(event: RecordedEvent, attributes: dict[str, str]) -> pb.UsageEvent:
    """A recorded event as the wire message."""
    return pb.UsageEvent(
        id=event.id,
        source=event.source,
        tenant=event.tenant,
        meter=event.meter,
        quantity=format_nanos(event.quantity_nanos),
        time=_ts(event.time_ns),
        attributes=attributes,
    )


def _tier_from_message(where: str, tier: pb.PriceTier, currency: str) -> PriceTier:
    if tier.unit_price.currency != currency:
        raise InvalidArgument(f"{where}: unit_price is in {tier.unit_price.currency!r}, the book in {currency}")
    return PriceTier(
        up_to_nanos=parse_decimal(tier.up_to, f"{where} up_to") if tier.up_to else None,
        unit_price_micros=tier.unit_price.micros,
        price_per_quantity_nanos=(
            parse_decimal(tier.price_per_quantity, f"{where} price_per_quantity") if tier.price_per_quantity else NANOS
        ),
    )


def _plan_from_message(plan: pb.Plan, currency: str) -> Plan:
    kind = _PLAN_KIND.get(plan.kind)
    if kind is None:
        raise InvalidArgument(f"plan {plan.name!r}: kind is required")
    if plan.HasField("monthly_commitment") and plan.monthly_commitment.currency != currency:
        raise InvalidArgument(f"plan {plan.name!r}: monthly_commitment is not in the book's currency {currency}")
    prices = []
    for price in plan.prices:
        where = f"plan {plan.name!r}, {price.meter}"
        prices.append(
            MeterPrice(
                meter=price.meter,
                match=tuple(sorted(price.match.items())),
                free_nanos=parse_decimal(price.free_quantity, f"{where} free_quantity") if price.free_quantity else 0,
                tiers=tuple(_tier_from_message(where, tier, currency) for tier in price.tiers),
            )
        )
    return Plan(plan.name, kind, tuple(prices), plan.monthly_commitment.micros, plan.description)


def _book_message(book: PriceBook) -> pb.PriceBook:
    return pb.PriceBook(
        tenant=book.tenant,
        version=book.version,
        currency=book.currency,
        effective_time=_ts(book.effective_ns),
        create_time=_ts(book.create_ns),
        plans=[
            pb.Plan(
                name=plan.name,
                kind=_PLAN_KIND_PB[plan.kind],
                monthly_commitment=_money(plan.monthly_commitment_micros, book.currency)
                if plan.kind is PlanKind.COMMITTED
                else None,
                description=plan.description,
                prices=[
                    pb.MeterPrice(
                        meter=price.meter,
                        match=dict(price.match),
                        free_quantity=format_nanos(price.free_nanos) if price.free_nanos else "",
                        tiers=[
                            pb.PriceTier(
                                up_to="" if tier.up_to_nanos is None else format_nanos(tier.up_to_nanos),
                                unit_price=_money(tier.unit_price_micros, book.currency),
                                price_per_quantity=format_nanos(tier.price_per_quantity_nanos),
                            )
                            for tier in price.tiers
                        ],
                    )
                    for price in plan.prices
                ],
            )
            for plan in book.plans
        ],
    )


def _budget_message(budget: Budget | None, tenant: str) -> pb.Budget:
    if budget is None:
        return pb.Budget(tenant=tenant)
    return pb.Budget(
        tenant=budget.tenant,
        monthly_limit=_money(budget.limit_micros, budget.currency),
        alert_threshold_percents=list(budget.thresholds),
        enforce=budget.enforce,
        prepaid=budget.prepaid,
        update_time=_ts(budget.update_ns),
        platform_monthly_limit=_money(budget.platform_limit_micros, budget.currency),
        platform_enforce=budget.platform_enforce,
    )


def _balance_message(balance: Balance) -> pb.Balance:
    return pb.Balance(
        tenant=balance.tenant,
        credit_balance=_money(balance.credit_micros, balance.currency),
        month_to_date_charges=_money(balance.month_to_date_micros, balance.currency),
        budget=_budget_message(balance.budget, balance.tenant),
        remaining_budget=_money(balance.remaining_budget_micros, balance.currency),
        plan=balance.plan,
        as_of_time=_ts(balance.as_of_ns),
    )


def _alert_message(alert: BudgetAlert) -> pb.BudgetAlert:
    return pb.BudgetAlert(
        alert_id=alert.alert_id,
        tenant=alert.tenant,
        kind=_ALERT_KIND[alert.kind],
        threshold_percent=alert.threshold_percent,
        period_start_time=_ts(alert.period_start_ns),
        month_to_date_charges=_money(alert.month_to_date_micros, alert.currency),
        monthly_limit=_money(alert.limit_micros, alert.currency),
        time=_ts(alert.time_ns),
    )


def _line_message(line: InvoiceLine, currency: str) -> pb.InvoiceLine:
    usage = line.kind is LineKind.USAGE
    return pb.InvoiceLine(
        line_id=line.line_id,
        kind=_LINE_KIND[line.kind],
        meter=line.meter,
        match=dict(line.match),
        tier_index=line.tier_index,
        quantity=format_nanos(line.quantity_nanos) if usage else "",
        unit_price=_money(line.unit_price_micros, currency) if usage else None,
        price_per_quantity=format_nanos(line.price_per_quantity_nanos) if usage else "",
        amount=_money(line.amount_micros, currency),
        event_count=line.event_count,
        description=line.description,
        price_book_version=line.version,
        price_book_tenant=line.book,
    )


def invoice_message(invoice: Invoice) -> pb.Invoice:
    currency = invoice.currency
    return pb.Invoice(
        tenant=invoice.tenant,
        invoice_id=invoice.invoice_id,
        period_start_time=_ts(invoice.period_start_ns),
        period_end_time=_ts(invoice.period_end_ns),
        state=_INVOICE_STATE[invoice.state],
        currency=currency,
        plan=invoice.plan,
        price_book_versions=list(invoice.versions),
        lines=[_line_message(line, currency) for line in invoice.lines],
        subtotal=_money(invoice.subtotal_micros, currency),
        credits_applied=_money(invoice.credits_micros, currency),
        total=_money(invoice.total_micros, currency),
        create_time=_ts(invoice.create_ns),
        finalize_time=_ts(invoice.finalize_ns),
    )


def _page(token: str) -> common_pb2.PageResponse:
    return common_pb2.PageResponse(next_page_token=token)


class BillingServicer(billing_service_pb2_grpc.BillingServiceServicer):
    """Each RPC: unpack, call the core (in a worker thread), pack."""

    def __init__(self, core: BillingCore, checker: PermissionChecker) -> None:
        self._core = core
        self._checker = checker

    @staticmethod
    async def _call(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def RecordUsage(self, request: pb.RecordUsageRequest, context: ServicerContext) -> Any:
        events = [event_from_message(event) for event in request.events]
        results = await self._call(
            self._core.record_usage, events, tenant_scope=_scope(request.tenant), allow_partial=request.allow_partial
        )
        span = trace.get_current_span()
        for status in EventStatus:
            span.set_attribute(f"aidc.billing.events.{status.value}", sum(r.status is status for r in results))
        return pb.RecordUsageResponse(
            results=[
                pb.UsageEventResult(source=r.source, id=r.id, status=_STATUS[r.status], reason=r.reason)
                for r in results
            ]
        )

    async def QueryUsage(self, request: pb.QueryUsageRequest, context: ServicerContext) -> Any:
        scope = _scope(request.tenant)
        query = UsageQuery(
            tenant=scope or None,
            meter=request.meter,
            window=_WINDOW.get(request.window, Window.WHOLE),
            aggregation=_AGGREGATION.get(request.aggregation, Aggregation.SUM),
            group_by=tuple(request.group_by),
            filter=dict(request.filter),
            start_ns=_ns(request.start_time),
            end_ns=_ns_or_none(request, "end_time"),
            page_size=request.page.page_size,
            page_token=request.page.page_token,
        )
        page = await self._call(self._core.query_usage, query)
        return pb.QueryUsageResponse(
            buckets=[
                pb.UsageBucket(
                    start_time=_ts(b.start_ns),
                    end_time=_ts(b.end_ns),
                    group=dict(b.group),
                    value=b.value,
                    event_count=b.event_count,
                )
                for b in page.items
            ],
            page=_page(page.next_token),
        )

    async def GetUsageEvent(self, request: pb.GetUsageEventRequest, context: ServicerContext) -> Any:
        found = await self._call(self._core.usage_event, _scope(request.tenant), request.source, request.id)
        attributes = dict(json.loads(found.event.attributes_json))
        return pb.GetUsageEventResponse(
            event=event_message(found.event, attributes),
            record_time=_ts(found.event.record_time_ns),
            invoice_id=found.invoice_id,
            line_id=found.line_id,
            attributed_cost=_money(found.cost_micros, found.currency),
            trace_id=attributes.get("trace_id", ""),
        )

    async def SetPriceBook(self, request: pb.SetPriceBookRequest, context: ServicerContext) -> Any:
        given = request.price_book
        currency = given.currency
        book = PriceBook(
            tenant=request.tenant,
            version=0,
            currency=currency,
            plans=tuple(_plan_from_message(plan, currency) for plan in given.plans),
            effective_ns=_ns(given.effective_time) if given.HasField("effective_time") else 0,
        )
        stored = await self._call(self._core.set_price_book, book)
        return pb.SetPriceBookResponse(price_book=_book_message(stored))

    async def GetPriceBook(self, request: pb.GetPriceBookRequest, context: ServicerContext) -> Any:
        book = await self._call(self._core.price_book, request.tenant, _ns_or_none(request, "at_time"))
        return pb.GetPriceBookResponse(price_book=_book_message(book))

    async def SetTenantPlan(self, request: pb.SetTenantPlanRequest, context: ServicerContext) -> Any:
        assigned = await self._call(
            self._core.set_tenant_plan, request.tenant, request.plan, _ns_or_none(request, "start_time")
        )
        return pb.SetTenantPlanResponse(
            tenant_plan=pb.TenantPlan(tenant=assigned.tenant, plan=assigned.plan, start_time=_ts(assigned.start_ns))
        )

    async def CheckBudget(self, request: pb.CheckBudgetRequest, context: ServicerContext) -> Any:
        tenant = _scope(request.tenant)
        cost = request.estimated_cost
        # From the cached read model on the event loop; a worker thread only if the view must be computed.
        if self._core.budgets.has_view(tenant):
            check = self._core.check_budget(tenant, cost.micros, cost.currency)
        else:
            check = await self._call(self._core.check_budget, tenant, cost.micros, cost.currency)
        return pb.CheckBudgetResponse(
            allowed=check.allowed,
            remaining=_money(check.remaining_micros, check.currency),
            reason=check.reason,
            as_of_time=_ts(check.as_of_ns),
        )

    async def SetBudget(self, request: pb.SetBudgetRequest, context: ServicerContext) -> Any:
        tenant = _scope(request.tenant)
        limit = request.monthly_limit if request.HasField("monthly_limit") else None
        # The permission table let the caller write budgets in this tenant; platform terms need the platform scope.
        by_platform = await self._checker.check(require_principal().subject, PLATFORM_TENANT, "budgets", "write")
        budget = await self._call(
            self._core.set_budget,
            tenant,
            None if limit is None else limit.micros,
            "" if limit is None else limit.currency,
            list(request.alert_threshold_percents),
            enforce=request.enforce,
            prepaid=request.prepaid if request.HasField("prepaid") else None,
            by_platform=by_platform,
        )
        return pb.SetBudgetResponse(budget=_budget_message(budget, tenant))

    async def GrantCredit(self, request: pb.GrantCreditRequest, context: ServicerContext) -> Any:
        grant, balance = await self._call(
            self._core.grant_credit,
            require_principal().subject,
            request.tenant,
            request.grant_id,
            request.amount.micros,
            request.amount.currency,
            request.reason,
            _ns_or_none(request, "expire_time"),
        )
        return pb.GrantCreditResponse(
            grant=pb.CreditGrant(
                tenant=grant.tenant,
                grant_id=grant.grant_id,
                amount=_money(grant.amount_micros, grant.currency),
                reason=grant.reason,
                expire_time=_ts(grant.expire_ns),
                create_time=_ts(grant.create_ns),
                granted_by=grant.granted_by,
            ),
            balance=_balance_message(balance),
        )

    async def GetBalance(self, request: pb.GetBalanceRequest, context: ServicerContext) -> Any:
        balance = await self._call(self._core.balance, _scope(request.tenant))
        return pb.GetBalanceResponse(balance=_balance_message(balance))

    async def ListBudgetAlerts(self, request: pb.ListBudgetAlertsRequest, context: ServicerContext) -> Any:
        since = _ns_or_none(request, "since_time") or 0
        page = await self._call(
            self._core.alerts, _scope(request.tenant), since, request.page.page_size, request.page.page_token
        )
        return pb.ListBudgetAlertsResponse(alerts=[_alert_message(a) for a in page.items], page=_page(page.next_token))

    async def CreateInvoice(self, request: pb.CreateInvoiceRequest, context: ServicerContext) -> Any:
        invoice = await self._call(
            self._core.create_invoice,
            _scope(request.tenant),
            _ns_or_none(request, "period_start_time"),
            _ns_or_none(request, "period_end_time"),
        )
        return pb.CreateInvoiceResponse(invoice=invoice_message(invoice))

    async def GetInvoice(self, request: pb.GetInvoiceRequest, context: ServicerContext) -> Any:
        invoice = await self._call(self._core.invoice, _scope(request.tenant), request.invoice_id)
        return pb.GetInvoiceResponse(invoice=invoice_message(invoice))

    async def ListInvoices(self, request: pb.ListInvoicesRequest, context: ServicerContext) -> Any:
        page = await self._call(
            self._core.invoices,
            _scope(request.tenant),
            _INVOICE_STATE_FILTER.get(request.state),
            request.page.page_size,
            request.page.page_token,
        )
        return pb.ListInvoicesResponse(invoices=[invoice_message(i) for i in page.items], page=_page(page.next_token))

    async def FinalizeInvoice(self, request: pb.FinalizeInvoiceRequest, context: ServicerContext) -> Any:
        invoice = await self._call(self._core.finalize_invoice, _scope(request.tenant), request.invoice_id)
        return pb.FinalizeInvoiceResponse(invoice=invoice_message(invoice))

    async def ExportInvoice(self, request: pb.ExportInvoiceRequest, context: ServicerContext) -> Any:
        tenant = _scope(request.tenant)
        if request.format == pb.EXPORT_FORMAT_JSON:
            invoice = await self._call(self._core.invoice, tenant, request.invoice_id)
            content = json_format.MessageToJson(invoice_message(invoice), indent=2).encode()
            kind, suffix = "application/json", "json"
        elif request.format == pb.EXPORT_FORMAT_CSV:
            invoice, text = await self._call(self._core.export_csv, tenant, request.invoice_id)
            content = text.encode()
            kind, suffix = "text/csv", "csv"
        else:
            raise InvalidArgument("format must be CSV or JSON")
        filename = f"{invoice.tenant}-{month_label(invoice.period_start_ns)}-{invoice.invoice_id}.{suffix}"
        return pb.ExportInvoiceResponse(content=content, content_type=kind, filename=filename)
