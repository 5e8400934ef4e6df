"""BillingCore: the billing service's domain operations (metering, price book, budgets, invoices).

Blocking (database) methods are synchronous; the servicer runs them in worker threads.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

from services.billing.core.budgets import ALL_TENANTS, BudgetReadModel, BudgetView, check_tenant_change, decide
from services.billing.core.invoices import CreditUse, assemble_invoice, invoice_csv, invoice_id_for, line_key
from services.billing.core.meters import METERS, REFERENCE_ATTRIBUTES
from services.billing.core.model import (
    DEFAULT_PLAN,
    DEFAULT_THRESHOLDS,
    Aggregation,
    AlertKind,
    Attribution,
    Balance,
    Budget,
    BudgetAlert,
    BudgetCheck,
    CreditGrant,
    EventResult,
    EventStatus,
    Invoice,
    InvoiceState,
    LedgerEntry,
    Match,
    Page,
    PriceBook,
    TenantPlan,
    UsageBucket,
    UsageEvent,
    UsageQuery,
    Window,
)
from services.billing.core.periods import DAY_NS, HOUR_NS, hour_of, is_month_start, month_label, month_start, next_month
from services.billing.core.pricebook import CURRENCY, default_price_book, validate_price_book
from services.billing.core.pricing import Cell, MonthPricer, PriceResolver
from services.billing.core.quantities import format_micros, format_nanos, round_half_even
from services.billing.core.usage import MAX_BATCH, UsageValidator
from services.billing.metrics import BillingMetrics
from services.billing.store import BillingStore, Rollup, Transaction
from services.mesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.mesh.pages import parse_offset

__all__ = ["BillingCore", "BillingPolicy"]

log = logging.getLogger(__name__)

_TENANT = re.compile(r"[a-z][a-z0-9-]{1,38}[a-z0-9]")
_GRANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")
_ATTRIBUTE_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: How far back each refresh reads other replicas' marks again: longer than a commit takes to become visible after
#: its mark's time was taken, plus the clock difference between replicas.
_MARK_LOOKBACK_NS = 10 * 10**9
_DEFAULT_PAGE, _MAX_PAGE = 50, 1000


@dataclass(frozen=True)
class BillingPolicy:
    """The settings the domain needs."""

    currency: str = "USD"
    max_future_seconds: int = 300
    invoice_grace_seconds: int = 3600


def _require_tenant(tenant: str) -> str:
    if not tenant:
        raise InvalidArgument("tenant is required")
    if not _TENANT.fullmatch(tenant):
        raise InvalidArgument(f"tenant {tenant[:50]!r} is not a tenant name")
    return tenant


def _page(page_size: int, token: str) -> tuple[int, int]:
    """(offset, limit) of a page request."""
    if page_size < 0:
        raise InvalidArgument("page_size must not be negative")
    limit = min(page_size or _DEFAULT_PAGE, _MAX_PAGE)
    if not token:
        return 0, limit
    try:
        kind, _, offset = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind != "o" or not offset:
            raise ValueError(token)
    except ValueError:
        raise InvalidArgument("page_token is not one this service issued") from None
    return parse_offset(offset), limit


def _next_token(offset: int, limit: int, returned: int) -> str:
    if returned < limit:
        return ""
    return base64.urlsafe_b64encode(f"o:{offset + returned}".encode()).decode()


class BillingCore:
    """Usage ledger, price book, budgets and invoices over a BillingStore."""

    def __init__(
        self,
        store: BillingStore,
        policy: BillingPolicy = BillingPolicy(),
        *,
        clock: Callable[[], int] = time.time_ns,
        metrics: BillingMetrics | None = None,
    ) -> None:
        self._metrics = metrics or BillingMetrics()
        if not CURRENCY.fullmatch(policy.currency):
            raise ValueError(f"platform currency {policy.currency!r} is not an ISO 4217 code")
        self._store = store
        self._policy = policy
        self._clock = clock
        self._validator = UsageValidator(policy.max_future_seconds * 10**9)
        self.budgets = BudgetReadModel(self._compute_view, lambda: month_start(self._clock()))
        self._marks_read_ns = time.time_ns()

    @property
    def currency(self) -> str:
        return self._policy.currency

    def start(self) -> None:
        """Prepares the database: seeds the platform default price book on first start."""
        self._store.migrate()
        with self._store.transaction() as tx:
            books = tx.price_books()
            if not books:
                tx.add_price_book(default_price_book(self.currency, effective_ns=0, create_ns=self._clock()))
                log.info("seeded the default price book (%s)", self.currency)
            elif books[0].currency != self.currency:
                raise FailedPrecondition(
                    f"the price books are in {books[0].currency}, but the platform currency is set to {self.currency}"
                )

    # -- usage -------------------------------------------------------------------------------------------

    def record_usage(
        self, events: Sequence[UsageEvent], *, tenant_scope: str = "", allow_partial: bool = False
    ) -> list[EventResult]:
        """Records a batch idempotently (see Transaction.ingest). Malformed events fail the whole batch with
        InvalidArgument (nothing recorded) unless ``allow_partial``, which reports them REJECTED instead."""
        if len(events) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} events per call, got {len(events)}")
        now = self._clock()
        entries: list[LedgerEntry | None] = []
        problems: dict[int, str] = {}
        validate = self._validator.validate
        for index, event in enumerate(events):
            try:
                entries.append(validate(event, now, tenant_scope))
            except InvalidArgument as exc:
                if not allow_partial:
                    raise InvalidArgument(f"events[{index}] ({event.source}/{event.id}): {exc.message}") from None
                problems[index] = exc.message
                entries.append(None)
        valid = [entry for entry in entries if entry is not None]
        outcomes = iter(self._ingest(valid, now) if valid else [])
        results = []
        counted = self._metrics.events
        for index, (event, entry) in enumerate(zip(events, entries, strict=True)):
            if entry is None:
                results.append(EventResult(event.source, event.id, EventStatus.REJECTED, problems[index]))
            else:
                status, reason = next(outcomes)
                results.append(EventResult(entry.source, entry.id, status, reason))
                if status is EventStatus.ACCEPTED:
                    self._metrics.usage(entry.tenant, entry.meter, entry.quantity_nanos / 1e9)
            counted[results[-1].status.value].inc()
        return results

    def _ingest(self, entries: Sequence[LedgerEntry], now: int) -> list[tuple[EventStatus, str]]:
        with self._store.transaction() as tx:
            outcomes = tx.ingest(entries, now)
        self.budgets.mark_dirty(
            {e.tenant for e, (status, _) in zip(entries, outcomes, strict=True) if status is EventStatus.ACCEPTED}
        )
        return outcomes

    def query_usage(self, query: UsageQuery) -> Page[UsageBucket]:
        """Aggregates a meter by window and attributes: from the hourly rollups when the range is whole hours and
        no reference attribute is involved, otherwise from the ledger itself (same results, slower)."""
        if query.tenant is not None:
            _require_tenant(query.tenant)
        if query.meter not in METERS:
            raise InvalidArgument(f"unknown meter {query.meter!r} (known: {', '.join(METERS)})")
        if len(set(query.group_by)) != len(query.group_by) or len(query.group_by) > 8:
            raise InvalidArgument("group_by takes at most 8 distinct attribute keys")
        for key in (*query.group_by, *query.filter):
            if not _ATTRIBUTE_KEY.fullmatch(key):
                raise InvalidArgument(f"{key[:70]!r} is not an attribute key")
        start = query.start_ns
        end = self._clock() if query.end_ns is None else query.end_ns
        if start < 0 or end <= start:
            raise InvalidArgument("the query range must have start_time < end_time")
        offset, limit = _page(query.page_size, query.page_token)
        uses_references = bool(REFERENCE_ATTRIBUTES & {*query.group_by, *query.filter})
        with self._store.snapshot() as tx:
            if start % HOUR_NS == 0 and end % HOUR_NS == 0 and not uses_references:
                samples = self._rollup_samples(tx.rollups(query.tenant, start, end, query.meter), query.filter)
            else:
                samples = self._ledger_samples(tx, query, start, end)
            buckets = _aggregate(samples, query, start, end)
        page = buckets[offset : offset + limit]
        return Page(page, _next_token(offset, limit, len(page)))

    @staticmethod
    def _rollup_samples(rollups: Sequence[Rollup], wanted: Mapping[str, str]) -> list[_Sample]:
        return [
            _Sample(r.hour_ns, r.dims, r.quantity_nanos, r.event_count, r.max_nanos)
            for r in rollups
            if all(r.dims.get(k) == v for k, v in wanted.items())
        ]

    @staticmethod
    def _ledger_samples(tx: Transaction, query: UsageQuery, start: int, end: int) -> list[_Sample]:
        samples = []
        for event in tx.events(query.tenant, query.meter, start, end):
            attributes = json.loads(event.attributes_json)
            if all(attributes.get(k) == v for k, v in query.filter.items()):
                samples.append(_Sample(event.time_ns, attributes, event.quantity_nanos, 1, event.quantity_nanos))
        return samples

    def usage_event(self, tenant_scope: str, source: str, event_id: str) -> Attribution:
        """A recorded event, with the invoice line its usage fell on and its share of that line's amount."""
        with self._store.snapshot() as tx:
            event = tx.find_event(source, event_id)
            if event is None or (tenant_scope and event.tenant != tenant_scope):
                raise NotFound(f"no usage event {source}/{event_id}")
            period = month_start(event.time_ns)
            invoice = tx.invoice(invoice_id_for(event.tenant, period))
            if invoice is None:
                return Attribution(event)
            cells = self._cells(tx.rollups(event.tenant, period, next_month(period), event.meter))
            pricer = self._pricer(tx, event.tenant, period)
            target = (hour_of(event.time_ns), event.dims_id)
            cell = next((c for c in sorted(cells, key=lambda c: c.order) if c.order == target), None)
            if cell is None:  # pragma: no cover - every ledger event is in a rollup cell
                return Attribution(event, invoice.invoice_id)
            for earlier in sorted(cells, key=lambda c: c.order):
                if earlier.order == target:
                    break
                pricer.add(earlier)
            position = pricer.position(cell)
            for seq, quantity in tx.cell_events(event.tenant, event.meter, cell.hour_ns, cell.dims_id):
                if seq == event.seq:
                    break
                position += quantity
            first = pricer.locate(cell, position).key
            spans = [(line.key, piece) for line, piece in pricer.spans(cell, position, position + event.quantity_nanos)]
        lines = {line_key(line): line for line in invoice.lines}
        if first not in lines:  # a draft computed before this event arrived
            return Attribution(event, invoice.invoice_id)
        share = Fraction(0)
        for key, piece in spans:
            line = lines.get(key)
            if line is not None and line.quantity_nanos:
                share += Fraction(line.amount_micros * piece, line.quantity_nanos)
        cost = round_half_even(share.numerator, share.denominator)
        return Attribution(event, invoice.invoice_id, lines[first].line_id, cost, invoice.currency)

    # -- price book and plans ----------------------------------------------------------------------------

    def set_price_book(self, book: PriceBook) -> PriceBook:
        """Stores a new version of a book. Its effective time must be a whole hour, not in the past (unset:
        the next whole hour)."""
        if book.tenant:
            _require_tenant(book.tenant)
        now = self._clock()
        effective = book.effective_ns or hour_of(now) + HOUR_NS
        if effective % HOUR_NS:
            raise InvalidArgument("effective_time must be a whole hour (UTC)")
        if effective < now:
            raise InvalidArgument("effective_time must not be in the past")
        validate_price_book(book, self.currency)
        with self._store.transaction() as tx:
            stored = tx.add_price_book(replace(book, effective_ns=effective, create_ns=now))
        self.budgets.invalidate()
        return stored

    def price_book(self, tenant: str, at_ns: int | None = None) -> PriceBook:
        """The book version that applies to ``tenant`` (its own, else the default; "" the default) at a time."""
        if tenant:
            _require_tenant(tenant)
        at = self._clock() if at_ns is None else at_ns
        with self._store.snapshot() as tx:
            books = tx.price_books({"", tenant})
        found = PriceResolver(books, tenant, DEFAULT_PLAN).book_at(at)
        if found is None:
            raise NotFound("no price book is in effect at that time")
        return found

    def set_tenant_plan(self, tenant: str, plan: str, start_ns: int | None = None) -> TenantPlan:
        """Puts a tenant on a plan from the first of a month (unset: next month) that is not already over."""
        _require_tenant(tenant)
        now = self._clock()
        start = next_month(month_start(now)) if start_ns is None else start_ns
        if not is_month_start(start):
            raise InvalidArgument("start_time must be the first instant of a calendar month (UTC)")
        if start < month_start(now):
            raise InvalidArgument("start_time must not be before the current month")
        with self._store.transaction() as tx:
            book = PriceResolver(tx.price_books({"", tenant}), tenant, DEFAULT_PLAN).book_at(start)
            if book is None or book.plan(plan) is None:
                raise InvalidArgument(f"the price book in effect then has no plan {plan!r}")
            assignment = TenantPlan(tenant, plan, start)
            tx.set_tenant_plan(assignment)
        self.budgets.invalidate(tenant)
        return assignment

    @staticmethod
    def _plan_at(tx: Transaction, tenant: str, at_ns: int) -> str:
        current = DEFAULT_PLAN
        for assignment in tx.tenant_plans(tenant):
            if assignment.start_ns <= at_ns:
                current = assignment.plan
        return current

    # -- pricing -----------------------------------------------------------------------------------------

    @staticmethod
    def _cells(rollups: Sequence[Rollup]) -> list[Cell]:
        return [Cell(r.hour_ns, r.meter, r.dims_id, r.dims, r.quantity_nanos, r.event_count) for r in rollups]

    def _pricer(self, tx: Transaction, tenant: str, period_start: int) -> MonthPricer:
        resolver = PriceResolver(tx.price_books({"", tenant}), tenant, self._plan_at(tx, tenant, period_start))

        def cell_events(cell: Cell) -> list[int]:
            return [quantity for _, quantity in tx.cell_events(tenant, cell.meter, cell.hour_ns, cell.dims_id)]

        return MonthPricer(resolver, cell_events)

    def _price_month(self, tx: Transaction, tenant: str, period_start: int) -> MonthPricer:
        """Prices a month from the database's sums per (meter, dimension set) over each stretch of hours with
        one price book version; only a price entry whose position reaches a tier bound in a stretch is walked
        hour cell by hour cell (its events are counted on the tier they begin in). The result equals walking
        every cell (a stretch without a bound inside counts all its events on one tier)."""
        pricer = self._pricer(tx, tenant, period_start)
        end = next_month(period_start)
        bounds = [period_start, *pricer.resolver.change_points(period_start, end), end]
        for low, high in zip(bounds, bounds[1:], strict=False):
            merged: dict[tuple[str, Match], Cell] = {}
            members: dict[tuple[str, Match], set[int]] = {}
            for meter, dims_id, quantity, count in tx.usage_totals(tenant, low, high):
                cell = Cell(low, meter, dims_id, tx.dims(dims_id), quantity, count)
                key = (meter, pricer.entry(cell)[1].match)
                known = merged.get(key)
                merged[key] = (
                    cell
                    if known is None
                    else known._replace(
                        quantity_nanos=known.quantity_nanos + quantity, event_count=known.event_count + count
                    )
                )
                members.setdefault(key, set()).add(dims_id)
            for key, cell in sorted(merged.items()):
                if pricer.reaches_bound(cell):
                    hours = self._cells(tx.rollups(tenant, low, high, cell.meter))
                    pricer.add_all(c for c in hours if c.dims_id in members[key])
                else:
                    pricer.add(cell)
        return pricer

    # -- budgets and credit ------------------------------------------------------------------------------

    def _compute_view(self, tenant: str) -> BudgetView:
        now = self._clock()
        period = month_start(now)
        with self._store.snapshot() as tx:
            month_to_date = self._price_month(tx, tenant, period).usage_total_micros()
            credit = sum(grant.available(now) for grant in tx.grants(tenant))
            budget = tx.budget(tenant)
            plan = self._plan_at(tx, tenant, period)
        view = BudgetView(tenant, self.currency, period, month_to_date, credit, budget, plan, now)
        self._raise_alerts(view)
        self._metrics.budget(tenant, not decide(view, 0).allowed, month_to_date)
        return view

    def _raise_alerts(self, view: BudgetView) -> None:
        budget = view.budget
        if budget is None:
            return
        due: list[BudgetAlert] = []
        label = month_label(view.month_start_ns)
        spent = view.month_to_date_micros
        if budget.limit_micros:
            for percent in budget.thresholds:
                if spent * 100 >= budget.limit_micros * percent:
                    due.append(self._alert(view, AlertKind.THRESHOLD, percent, f"{view.tenant}-{label}-{percent}pct"))
        if budget.prepaid and spent > 0 and spent >= view.credit_micros:
            due.append(self._alert(view, AlertKind.CREDIT_EXHAUSTED, 0, f"{view.tenant}-{label}-credit"))
        if not due:
            return
        with self._store.snapshot() as tx:
            fresh = [a for a in due if not tx.alert_exists(a.alert_id)]
        if fresh:
            with self._store.transaction() as tx:
                for alert in fresh:
                    if tx.add_alert(alert):
                        self._metrics.alert(alert.kind.value)
                        log.warning("budget alert %s: %s month to date", alert.alert_id, format_micros(spent))

    def _alert(self, view: BudgetView, kind: AlertKind, percent: int, alert_id: str) -> BudgetAlert:
        limit = view.budget.limit_micros if view.budget else None
        return BudgetAlert(
            alert_id,
            view.tenant,
            kind,
            percent,
            view.month_start_ns,
            view.month_to_date_micros,
            limit,
            view.currency,
            view.as_of_ns,
        )

    def check_budget(self, tenant: str, estimated_micros: int, currency: str) -> BudgetCheck:
        """Answered from the read model (no database work once the tenant's view exists)."""
        _require_tenant(tenant)
        if estimated_micros < 0:
            raise InvalidArgument("estimated_cost must not be negative")
        self._check_currency(currency, estimated_micros, "estimated_cost")
        return decide(self.budgets.get(tenant), estimated_micros)

    def _check_currency(self, currency: str, micros: int, what: str) -> None:
        if currency != self.currency and (currency or micros):
            raise InvalidArgument(f"{what} must be in the platform currency {self.currency}, not {currency!r}")

    def set_budget(
        self,
        tenant: str,
        limit_micros: int | None,
        currency: str,
        thresholds: Sequence[int] = (),
        *,
        enforce: bool = False,
        prepaid: bool | None = None,
        by_platform: bool = True,
    ) -> Budget | None:
        """Sets the monthly budget (no limit and not prepaid removes it); returns it (None: removed). ``prepaid``
        None keeps what is set.

        What the platform (``by_platform``) sets also bounds the tenant: a tenant may only tighten the platform's
        limit and enforcement, and never change prepaid (``check_tenant_change``)."""
        _require_tenant(tenant)
        if limit_micros is not None:
            if limit_micros <= 0:
                raise InvalidArgument("monthly_limit must be positive")
            self._check_currency(currency, limit_micros, "monthly_limit")
        if any(not 1 <= p <= 1000 for p in thresholds) or len(set(thresholds)) != len(thresholds):
            raise InvalidArgument("alert thresholds are distinct percentages from 1 to 1000")
        if enforce and limit_micros is None:
            raise InvalidArgument("enforce needs a monthly_limit")
        with self._store.transaction() as tx:
            current = tx.budget(tenant)
            if by_platform:
                bounds = (limit_micros, enforce)
            else:
                check_tenant_change(current, limit_micros, enforce, prepaid)
                bounds = (current.platform_limit_micros, current.platform_enforce) if current else (None, False)
            if prepaid is None or not by_platform:
                prepaid = current is not None and current.prepaid
            budget = Budget(
                tenant,
                limit_micros,
                self.currency,
                tuple(sorted(thresholds)) or DEFAULT_THRESHOLDS,
                enforce,
                prepaid,
                self._clock(),
                *bounds,
            )
            if limit_micros is None and not prepaid:
                tx.delete_budget(tenant)
            else:
                tx.put_budget(budget)
        self.budgets.refresh(tenant)
        return budget if (limit_micros is not None or prepaid) else None

    def grant_credit(
        self,
        subject: str,
        tenant: str,
        grant_id: str,
        amount_micros: int,
        currency: str,
        reason: str = "",
        expire_ns: int | None = None,
    ) -> tuple[CreditGrant, Balance]:
        """Adds prepaid credit; a retry with the same grant_id returns the existing grant."""
        _require_tenant(tenant)
        if not _GRANT_ID.fullmatch(grant_id):
            raise InvalidArgument("grant_id is 1-100 letters, digits, '.', '_', ':' or '-'")
        if amount_micros <= 0:
            raise InvalidArgument("amount must be positive")
        self._check_currency(currency, amount_micros, "amount")
        if len(reason) > 200 or _CONTROL.search(reason):
            raise InvalidArgument("reason is at most 200 characters without control characters")
        now = self._clock()
        if expire_ns is not None and expire_ns <= now:
            raise InvalidArgument("expire_time must be in the future")
        grant = CreditGrant(tenant, grant_id, amount_micros, self.currency, reason, expire_ns, now, subject)
        with self._store.transaction() as tx:
            existing = next((g for g in tx.grants(tenant) if g.grant_id == grant_id), None)
            if existing is None:
                tx.add_grant(grant)
            elif (existing.amount_micros, existing.expire_ns) != (amount_micros, expire_ns):
                raise AlreadyExists(f"grant {grant_id} exists with a different amount or expiry")
            else:
                grant = existing
        return grant, self.balance(tenant)

    def balance(self, tenant: str) -> Balance:
        """Credit, month-to-date charges and budget position, freshly computed."""
        _require_tenant(tenant)
        view = self.budgets.refresh(tenant)
        return Balance(
            tenant=tenant,
            currency=view.currency,
            credit_micros=view.credit_micros,
            month_to_date_micros=view.month_to_date_micros,
            budget=view.budget,
            remaining_budget_micros=view.remaining_budget_micros,
            plan=view.plan,
            as_of_ns=view.as_of_ns,
        )

    def alerts(self, tenant: str, since_ns: int = 0, page_size: int = 0, token: str = "") -> Page[BudgetAlert]:
        """A tenant's budget alerts, newest first (its view is refreshed first, so due alerts are raised)."""
        _require_tenant(tenant)
        offset, limit = _page(page_size, token)
        self.budgets.refresh(tenant)
        with self._store.snapshot() as tx:
            items = tx.alerts(tenant, since_ns, offset, limit)
        return Page(items, _next_token(offset, limit, len(items)))

    def refresh_budgets(self) -> list[str]:
        """Recomputes stale budget views (and raises their alerts); the server calls this periodically. Views other
        replicas changed (the marks their transactions left) count as stale too."""
        # Marks carry the writing replica's wall clock (not the core's clock, which tests set): read them by it too.
        now = time.time_ns()
        with self._store.snapshot() as tx:
            changed = tx.views_changed_since(self._marks_read_ns - _MARK_LOOKBACK_NS)
        self._marks_read_ns = now
        self.budgets.mark_held_dirty(None if ALL_TENANTS in changed else changed)
        return self.budgets.refresh_dirty()

    # -- invoices ----------------------------------------------------------------------------------------

    def create_invoice(self, tenant: str, start_ns: int | None = None, end_ns: int | None = None) -> Invoice:
        """Computes (or recomputes) the draft invoice of one past calendar month (unset: the previous one)."""
        _require_tenant(tenant)
        now = self._clock()
        if start_ns is None and end_ns is None:
            start_ns = month_start(month_start(now) - 1)
        if start_ns is None:
            raise InvalidArgument("period_start_time is required when period_end_time is set")
        if not is_month_start(start_ns):
            raise InvalidArgument("an invoice period starts at the first instant of a calendar month (UTC)")
        end = next_month(start_ns)
        if end_ns is not None and end_ns != end:
            raise InvalidArgument("an invoice period is exactly one calendar month")
        if end > now:
            raise InvalidArgument(f"the period {month_label(start_ns)} has not ended yet")
        with self._store.transaction() as tx:
            existing = tx.invoice(invoice_id_for(tenant, start_ns), with_lines=False)
            if existing is not None and existing.state is InvoiceState.FINALIZED:
                raise AlreadyExists(f"invoice {existing.invoice_id} is finalized")
            invoice = self._compute_invoice(tx, tenant, start_ns, now)
            tx.save_invoice(invoice)
        return invoice

    def _compute_invoice(
        self,
        tx: Transaction,
        tenant: str,
        start: int,
        now: int,
        credits: Sequence[CreditUse] = (),
        state: InvoiceState = InvoiceState.DRAFT,
    ) -> Invoice:
        pricer = self._price_month(tx, tenant, start)
        return assemble_invoice(
            tenant=tenant,
            period_start_ns=start,
            period_end_ns=next_month(start),
            currency=self.currency,
            plan=pricer.resolver.at(start).plan,
            priced=pricer.lines(),
            credits=credits,
            state=state,
            create_ns=now,
            finalize_ns=now if state is InvoiceState.FINALIZED else None,
        )

    def invoice(self, tenant: str, invoice_id: str) -> Invoice:
        _require_tenant(tenant)
        with self._store.snapshot() as tx:
            invoice = tx.invoice(invoice_id)
        if invoice is None or invoice.tenant != tenant:
            raise NotFound(f"invoice {invoice_id[:120]!r} not found")
        return invoice

    def invoices(self, tenant: str, state: InvoiceState | None, page_size: int = 0, token: str = "") -> Page[Invoice]:
        _require_tenant(tenant)
        offset, limit = _page(page_size, token)
        with self._store.snapshot() as tx:
            items = tx.invoices(tenant, state, offset, limit)
        return Page(items, _next_token(offset, limit, len(items)))

    def finalize_invoice(self, tenant: str, invoice_id: str) -> Invoice:
        """Recomputes the draft one last time, applies prepaid credit (soonest-expiring grants first) and freezes
        it. Finalizing a finalized invoice returns it unchanged."""
        _require_tenant(tenant)
        now = self._clock()
        with self._store.transaction() as tx:
            draft = tx.invoice(invoice_id, with_lines=False)
            if draft is None or draft.tenant != tenant:
                raise NotFound(f"invoice {invoice_id[:120]!r} not found")
            if draft.state is InvoiceState.FINALIZED:
                return self.invoice(tenant, invoice_id)
            ready = draft.period_end_ns + self._policy.invoice_grace_seconds * 10**9
            if now < ready:
                raise FailedPrecondition(
                    f"invoice {invoice_id} may be finalized from {(ready - now) // 10**9} s from now "
                    "(the grace period for late usage)"
                )
            due = self._compute_invoice(tx, tenant, draft.period_start_ns, now).total_micros
            uses = []
            grants = sorted(
                tx.grants(tenant), key=lambda g: (g.expire_ns is None, g.expire_ns or 0, g.create_ns, g.grant_id)
            )
            for grant in grants:
                take = min(grant.available(now), due)
                if take > 0:
                    uses.append(CreditUse(grant.grant_id, take))
                    due -= take
            final = self._compute_invoice(tx, tenant, draft.period_start_ns, now, uses, InvoiceState.FINALIZED)
            final = replace(final, create_ns=draft.create_ns)
            tx.save_invoice(final)
            for use in uses:
                tx.apply_credit(final.invoice_id, tenant, use.grant_id, use.amount_micros, now)
        self.budgets.mark_dirty([tenant])
        return final

    def export_csv(self, tenant: str, invoice_id: str) -> tuple[Invoice, str]:
        invoice = self.invoice(tenant, invoice_id)
        return invoice, invoice_csv(invoice)


@dataclass(frozen=True, slots=True)
class _Sample:
    """A rollup cell or a single event, as input of a usage aggregation."""

    time_ns: int
    attributes: Mapping[str, str]
    quantity_nanos: int
    event_count: int
    max_nanos: int


def _window_bounds(window: Window, at_ns: int, start: int, end: int) -> tuple[int, int]:
    if window is Window.HOUR:
        low, high = hour_of(at_ns), hour_of(at_ns) + HOUR_NS
    elif window is Window.DAY:
        low = at_ns - at_ns % DAY_NS
        high = low + DAY_NS
    elif window is Window.MONTH:
        low = month_start(at_ns)
        high = next_month(low)
    else:
        low, high = start, end
    return max(low, start), min(high, end)


def _aggregate(samples: Sequence[_Sample], query: UsageQuery, start: int, end: int) -> list[UsageBucket]:
    acc: dict[tuple[int, int, tuple[str, ...]], list[int]] = {}
    bounds_memo: dict[int, tuple[int, int]] = {}
    for sample in samples:
        hour = hour_of(sample.time_ns)
        bounds = bounds_memo.get(hour)
        if bounds is None:
            bounds = bounds_memo[hour] = _window_bounds(query.window, hour, start, end)
        group = tuple(sample.attributes.get(key, "") for key in query.group_by)
        slot = acc.setdefault((*bounds, group), [0, 0, 0])
        slot[0] += sample.quantity_nanos
        slot[1] += sample.event_count
        slot[2] = max(slot[2], sample.max_nanos)
    buckets = []
    for (low, high, group), (total, count, largest) in sorted(acc.items()):
        if query.aggregation is Aggregation.COUNT:
            value = str(count)
        elif query.aggregation is Aggregation.MAX:
            value = format_nanos(largest)
        else:
            value = format_nanos(total)
        buckets.append(UsageBucket(low, high, dict(zip(query.group_by, group, strict=True)), value, count))
    return buckets
