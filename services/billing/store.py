"""Persistence of the billing service (SQLAlchemy Core: a SQLite file by default, PostgreSQL by URL).

The usage ledger is append-only and laid out for ingest speed: rows are appended in record order (an integer
``seq`` key), and idempotency uses a compact index on a 64-bit hash of (source, id) instead of a text primary
key, with the full (source, id) compared on every hash hit, so a collision never merges two events. Writers are
serialized (one writer per database: a process lock, plus ``BEGIN IMMEDIATE`` on SQLite and a table lock on
PostgreSQL), which makes "look up the batch's keys, then append" atomic. In the same transaction the batch is
folded into hourly rollups per (tenant, meter, dimension set), which is what queries, budgets and invoices read.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

from sqlalchemy import (
    and_,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection

from services.billing.core.budgets import ALL_TENANTS
from services.billing.core.model import (
    AlertKind,
    Budget,
    BudgetAlert,
    CreditGrant,
    EventStatus,
    Invoice,
    InvoiceLine,
    InvoiceState,
    LedgerEntry,
    LineKind,
    MeterPrice,
    Plan,
    PlanKind,
    PriceBook,
    PriceTier,
    RecordedEvent,
    TenantPlan,
)
from services.billing.core.periods import HOUR_NS, month_label, month_start
from services.billing.core.quantities import NANOS
from services.billing.core.usage import key_hash
from services.billing.schema import (
    MIGRATIONS,
    budget_alerts,
    budgets,
    credit_applications,
    credit_grants,
    invoice_lines,
    invoices,
    price_books,
    tenant_plans,
    usage_dimensions,
    usage_events,
    usage_rollups,
    view_marks,
)
from services.mesh.db import Database

__all__ = ["BillingStore", "Transaction", "Rollup"]


class Rollup(NamedTuple):
    """One hourly rollup cell."""

    tenant: str
    hour_ns: int
    meter: str
    dims_id: int
    dims: Mapping[str, str]
    quantity_nanos: int
    event_count: int
    max_nanos: int


def _sqlite_tuning(dbapi_connection: Any, _record: Any) -> None:
    """A bigger page cache keeps the dedup index in memory; checkpointing every ~40 MB of WAL instead of every
    4 MB writes a page dirtied by many consecutive batches to the database file once, not once per batch."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA cache_size=-65536")
    cursor.execute("PRAGMA wal_autocheckpoint=10000")
    cursor.execute("PRAGMA journal_size_limit=67108864")
    cursor.close()


def _book_body(book: PriceBook) -> str:
    return json.dumps(
        {
            "plans": [
                {
                    "name": plan.name,
                    "kind": plan.kind.value,
                    "commitment_micros": plan.monthly_commitment_micros,
                    "description": plan.description,
                    "prices": [
                        {
                            "meter": price.meter,
                            "match": [list(pair) for pair in price.match],
                            "free_nanos": price.free_nanos,
                            "tiers": [
                                {
                                    "up_to_nanos": tier.up_to_nanos,
                                    "unit_price_micros": tier.unit_price_micros,
                                    "price_per_quantity_nanos": tier.price_per_quantity_nanos,
                                }
                                for tier in price.tiers
                            ],
                        }
                        for price in plan.prices
                    ],
                }
                for plan in book.plans
            ]
        },
        sort_keys=True,
    )


def _book_from_row(row: Any) -> PriceBook:
    body = json.loads(row.body)
    plans = tuple(
        Plan(
            name=plan["name"],
            kind=PlanKind(plan["kind"]),
            monthly_commitment_micros=plan["commitment_micros"],
            description=plan["description"],
            prices=tuple(
                MeterPrice(
                    meter=price["meter"],
                    match=tuple((k, v) for k, v in price["match"]),
                    free_nanos=price["free_nanos"],
                    tiers=tuple(
                        PriceTier(t["up_to_nanos"], t["unit_price_micros"], t["price_per_quantity_nanos"])
                        for t in price["tiers"]
                    ),
                )
                for price in plan["prices"]
            ),
        )
        for plan in body["plans"]
    )
    return PriceBook(row.book, row.version, row.currency, plans, row.effective_time, row.create_time)


def _event_from_row(row: Any) -> RecordedEvent:
    return RecordedEvent(
        seq=row.seq,
        source=row.source,
        id=row.event_id,
        tenant=row.tenant,
        meter=row.meter,
        quantity_nanos=row.quantity_nanos,
        time_ns=row.event_time,
        attributes_json=row.attributes,
        dims_id=row.dims_id,
        record_time_ns=row.record_time,
    )


def _content(item: LedgerEntry | RecordedEvent) -> tuple[str, str, int, int, str]:
    return (item.tenant, item.meter, item.quantity_nanos, item.time_ns, item.attributes_json)


_CONTENT_FIELDS = ("tenant", "meter", "quantity", "time", "attributes")
_INSERT_COLUMNS = (
    "key_hash, source, event_id, tenant, meter, quantity_nanos, event_time, dims_id, attributes, record_time"
)
_EVENT_COLUMNS = f"seq, {_INSERT_COLUMNS}"


def _conflict(new: LedgerEntry, prior: LedgerEntry | RecordedEvent) -> str:
    """Empty for an identical retry; otherwise the reason the event is rejected."""
    differing = [name for name, a, b in zip(_CONTENT_FIELDS, _content(new), _content(prior), strict=True) if a != b]
    if not differing:
        return ""
    verb = "differs" if len(differing) == 1 else "differ"
    return f"conflicting duplicate: {' and '.join(differing)} {verb} from the event recorded with this id"


class BillingStore:
    """The billing database: serialized write transactions and lock-free read snapshots."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._write_lock = threading.Lock()
        # dims JSON -> id and id -> dims of committed dimension sets (append-only, so never stale).
        self._dims_ids: dict[str, int] = {}
        self._dims_by_id: dict[int, dict[str, str]] = {}
        if db.is_sqlite:
            event.listen(db.engine, "connect", _sqlite_tuning)

    def migrate(self) -> None:
        self.db.migrate(MIGRATIONS, "billing")

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """The one writer: reads in it see every committed write, and nothing commits concurrently."""
        with self._write_lock, self.db.engine.connect() as conn:
            if self.db.is_sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.execute(text("LOCK TABLE billing_usage_events IN SHARE ROW EXCLUSIVE MODE"))
            tx = Transaction(self, conn)
            try:
                yield tx
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            for action in tx.after_commit:
                action()

    @contextmanager
    def snapshot(self) -> Iterator[Transaction]:
        """Reads without taking the write lock (for queries, balances and listings)."""
        with self.db.engine.connect() as conn:
            try:
                yield Transaction(self, conn)
            finally:
                conn.rollback()

    def _remember_dims(self, dims: Mapping[str, int]) -> None:
        for dims_json, dims_id in dims.items():
            self._dims_ids[dims_json] = dims_id
            self._dims_by_id[dims_id] = json.loads(dims_json)


def _dims_key(dims_json: str) -> str:
    return hashlib.sha256(dims_json.encode()).hexdigest()


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Transaction:
    """Reads and writes on one connection (a write transaction or a read snapshot)."""

    def __init__(self, store: BillingStore, conn: Connection) -> None:
        self._store = store
        self.conn = conn
        self.after_commit: list[Callable[[], None]] = []

    # -- the ledger --------------------------------------------------------------------------------------

    def ingest(self, entries: Sequence[LedgerEntry], now_ns: int) -> list[tuple[EventStatus, str]]:
        """Appends the new events of a batch and folds them into the rollups; returns each entry's outcome.

        A (source, id) already recorded, or earlier in the batch, is a DUPLICATE when its content is identical
        and REJECTED otherwise; an event dated in a finalized month is REJECTED.

        This is the hot path, so its statements go to the driver as plain SQL (portable between SQLite and
        PostgreSQL, with the dialect's placeholder) instead of through SQLAlchemy's per-row parameter handling.
        """
        known: dict[tuple[str, str], LedgerEntry | RecordedEvent] = {}
        hashes = list({entry.key_hash for entry in entries})
        for chunk in _chunks(hashes, 1000):
            sql = f"SELECT {_EVENT_COLUMNS} FROM {usage_events.name} WHERE key_hash IN ({self._marks(len(chunk))})"
            for row in self.conn.exec_driver_sql(sql, tuple(chunk)):
                recorded = _event_from_row(row)
                known[(recorded.source, recorded.id)] = recorded

        months: dict[int, int] = {}
        entry_months = []
        for entry in entries:
            hour = entry.time_ns - entry.time_ns % HOUR_NS
            month = months.get(hour)
            if month is None:
                month = months[hour] = month_start(hour)
            entry_months.append(month)
        finalized = self._finalized({e.tenant for e in entries}, set(entry_months))

        outcomes: list[tuple[EventStatus, str]] = []
        accepted: list[LedgerEntry] = []
        for entry, month in zip(entries, entry_months, strict=True):
            prior = known.get((entry.source, entry.id))
            if prior is not None:
                reason = _conflict(entry, prior)
                outcomes.append((EventStatus.REJECTED, reason) if reason else (EventStatus.DUPLICATE, ""))
                continue
            if finalized and (entry.tenant, month) in finalized:
                reason = f"the invoice of tenant {entry.tenant} for {month_label(month)} is finalized"
                outcomes.append((EventStatus.REJECTED, reason))
                continue
            known[(entry.source, entry.id)] = entry
            accepted.append(entry)
            outcomes.append((EventStatus.ACCEPTED, ""))
        if accepted:
            self._append(accepted, now_ns)
            self.mark_views({entry.tenant for entry in accepted})
        return outcomes

    def mark_views(self, tenants: Iterable[str]) -> None:
        """Notes, in this transaction, that these tenants' budget views changed (ALL_TENANTS: every view), so every
        replica refreshes the views it holds (``views_changed_since``)."""
        rows = [(tenant, time.time_ns()) for tenant in sorted(set(tenants))]
        if rows:
            self.conn.exec_driver_sql(
                f"INSERT INTO {view_marks.name} (tenant, changed_time) VALUES ({self._marks(2)}) "
                "ON CONFLICT (tenant) DO UPDATE SET changed_time = excluded.changed_time",
                rows,
            )

    def views_changed_since(self, since_ns: int) -> set[str]:
        query = select(view_marks.c.tenant).where(view_marks.c.changed_time > since_ns)
        return set(self.conn.execute(query).scalars())

    def _marks(self, count: int) -> str:
        """``count`` positional placeholders of the driver ("?" for sqlite3, "%s" for psycopg)."""
        mark = "?" if self._store.db.is_sqlite else "%s"
        return ",".join([mark] * count)

    def _finalized(self, tenants: set[str], months: set[int]) -> set[tuple[str, int]]:
        sql = (
            f"SELECT tenant, period_start FROM {invoices.name} WHERE state = {self._marks(1)} "
            f"AND tenant IN ({self._marks(len(tenants))}) AND period_start IN ({self._marks(len(months))})"
        )
        params = (InvoiceState.FINALIZED.value, *sorted(tenants), *sorted(months))
        return {(row[0], row[1]) for row in self.conn.exec_driver_sql(sql, params)}

    def _dims_ids(self, dims_jsons: Iterable[str]) -> dict[str, int]:
        """Ids of dimension sets, creating the missing ones (remembered once the transaction commits)."""
        cache = self._store._dims_ids
        found = {d: cache[d] for d in dims_jsons if d in cache}
        missing = sorted(set(dims_jsons) - found.keys())
        if not missing:
            return found
        keys = {_dims_key(d): d for d in missing}
        table = usage_dimensions
        rows = self.conn.execute(select(table.c.dims_key, table.c.dims_id).where(table.c.dims_key.in_(list(keys))))
        fresh = {keys[row.dims_key]: row.dims_id for row in rows}
        for dims_json in missing:
            if dims_json not in fresh:
                result = self.conn.execute(insert(table).values(dims_key=_dims_key(dims_json), dims=dims_json))
                fresh[dims_json] = int(result.inserted_primary_key[0])  # type: ignore[index]
        self.after_commit.append(lambda: self._store._remember_dims(fresh))
        return {**found, **fresh}

    def _append(self, entries: Sequence[LedgerEntry], now_ns: int) -> None:
        dims_ids = self._dims_ids({entry.dims_json for entry in entries})
        rows = []
        cells: dict[tuple[str, int, str, int], list[int]] = {}
        for entry in entries:
            dims_id = dims_ids[entry.dims_json]
            quantity = entry.quantity_nanos
            rows.append(
                (
                    entry.key_hash,
                    entry.source,
                    entry.id,
                    entry.tenant,
                    entry.meter,
                    quantity,
                    entry.time_ns,
                    dims_id,
                    entry.attributes_json,
                    now_ns,
                )
            )
            key = (entry.tenant, entry.time_ns - entry.time_ns % HOUR_NS, entry.meter, dims_id)
            cell = cells.get(key)
            if cell is None:
                cells[key] = [quantity, 1, quantity]
            else:
                cell[0] += quantity
                cell[1] += 1
                if quantity > cell[2]:
                    cell[2] = quantity
        self.conn.exec_driver_sql(
            f"INSERT INTO {usage_events.name} ({_INSERT_COLUMNS}) VALUES ({self._marks(len(rows[0]))})", rows
        )
        upserts = [
            (tenant, hour, meter, dims_id, *divmod(total, NANOS), count, largest)
            for (tenant, hour, meter, dims_id), (total, count, largest) in cells.items()
        ]
        table = usage_rollups.name
        self.conn.exec_driver_sql(
            f"INSERT INTO {table} (tenant, hour, meter, dims_id, sum_units, sum_nanos, event_count, max_nanos) "
            f"VALUES ({self._marks(8)}) ON CONFLICT (tenant, hour, meter, dims_id) DO UPDATE SET "
            f"sum_units = {table}.sum_units + excluded.sum_units, "
            f"sum_nanos = {table}.sum_nanos + excluded.sum_nanos, "
            f"event_count = {table}.event_count + excluded.event_count, "
            f"max_nanos = CASE WHEN excluded.max_nanos > {table}.max_nanos "
            f"THEN excluded.max_nanos ELSE {table}.max_nanos END",
            upserts,
        )

    def find_event(self, source: str, event_id: str) -> RecordedEvent | None:
        query = select(usage_events).where(
            usage_events.c.key_hash == key_hash(source, event_id),
            usage_events.c.source == source,
            usage_events.c.event_id == event_id,
        )
        row = self.conn.execute(query).first()
        return None if row is None else _event_from_row(row)

    def dims(self, dims_id: int) -> dict[str, str]:
        """The dimension set of an id."""
        cache = self._store._dims_by_id
        found = cache.get(dims_id)
        if found is None:
            row = self.conn.execute(select(usage_dimensions.c.dims).where(usage_dimensions.c.dims_id == dims_id)).one()
            found = cache[dims_id] = json.loads(row.dims)
        return found

    def rollups(self, tenant: str | None, start_ns: int, end_ns: int, meter: str | None = None) -> list[Rollup]:
        """Rollup cells of hours in [start_ns, end_ns) (tenant None: every tenant; meter None: every meter)."""
        table = usage_rollups
        conditions = [table.c.hour >= start_ns, table.c.hour < end_ns]
        if tenant is not None:
            conditions.append(table.c.tenant == tenant)
        if meter is not None:
            conditions.append(table.c.meter == meter)
        rows = self.conn.execute(select(table).where(and_(*conditions)))
        return [
            Rollup(
                tenant=row.tenant,
                hour_ns=row.hour,
                meter=row.meter,
                dims_id=row.dims_id,
                dims=self.dims(row.dims_id),
                quantity_nanos=row.sum_units * NANOS + row.sum_nanos,
                event_count=row.event_count,
                max_nanos=row.max_nanos,
            )
            for row in rows
        ]

    def usage_totals(self, tenant: str, start_ns: int, end_ns: int) -> list[tuple[str, int, int, int]]:
        """(meter, dims_id, quantity in nanos, event count) of a tenant's hours in [start_ns, end_ns), summed by
        the database over the rollup cells."""
        table = usage_rollups
        query = (
            select(
                table.c.meter,
                table.c.dims_id,
                func.sum(table.c.sum_units),
                func.sum(table.c.sum_nanos),
                func.sum(table.c.event_count),
            )
            .where(table.c.tenant == tenant, table.c.hour >= start_ns, table.c.hour < end_ns)
            .group_by(table.c.meter, table.c.dims_id)
        )
        return [
            (meter, dims_id, int(units) * NANOS + int(nanos), int(count))
            for meter, dims_id, units, nanos, count in self.conn.execute(query)
        ]

    def events(self, tenant: str | None, meter: str, start_ns: int, end_ns: int) -> list[RecordedEvent]:
        """Ledger events of a meter in [start_ns, end_ns), in time order."""
        table = usage_events
        conditions = [table.c.meter == meter, table.c.event_time >= start_ns, table.c.event_time < end_ns]
        if tenant is not None:
            conditions.append(table.c.tenant == tenant)
        query = select(table).where(and_(*conditions)).order_by(table.c.event_time, table.c.seq)
        return [_event_from_row(row) for row in self.conn.execute(query)]

    def cell_events(self, tenant: str, meter: str, hour_ns: int, dims_id: int) -> list[tuple[int, int]]:
        """(seq, quantity) of the events of one rollup cell, in (time, seq) order."""
        table = usage_events
        query = (
            select(table.c.seq, table.c.quantity_nanos)
            .where(
                table.c.tenant == tenant,
                table.c.meter == meter,
                table.c.event_time >= hour_ns,
                table.c.event_time < hour_ns + HOUR_NS,
                table.c.dims_id == dims_id,
            )
            .order_by(table.c.event_time, table.c.seq)
        )
        return [(row.seq, row.quantity_nanos) for row in self.conn.execute(query)]

    def event_count(self) -> int:
        return int(self.conn.execute(select(func.count()).select_from(usage_events)).scalar_one())

    # -- price books and plans ---------------------------------------------------------------------------

    def price_books(self, tenants: Iterable[str] = ("",)) -> list[PriceBook]:
        """Every version of the books of these tenants ("" is the platform default)."""
        query = select(price_books).where(price_books.c.book.in_(sorted(set(tenants))))
        return [_book_from_row(row) for row in self.conn.execute(query.order_by(price_books.c.version))]

    def add_price_book(self, book: PriceBook) -> PriceBook:
        """Stores ``book`` as the next version of its book; returns it with that version."""
        self.mark_views([ALL_TENANTS])
        latest = self.conn.execute(
            select(func.max(price_books.c.version)).where(price_books.c.book == book.tenant)
        ).scalar_one()
        stored = PriceBook(book.tenant, (latest or 0) + 1, book.currency, book.plans, book.effective_ns, book.create_ns)
        self.conn.execute(
            insert(price_books).values(
                book=stored.tenant,
                version=stored.version,
                currency=stored.currency,
                effective_time=stored.effective_ns,
                create_time=stored.create_ns,
                body=_book_body(stored),
            )
        )
        return stored

    def tenant_plans(self, tenant: str) -> list[TenantPlan]:
        query = select(tenant_plans).where(tenant_plans.c.tenant == tenant).order_by(tenant_plans.c.start_time)
        return [TenantPlan(row.tenant, row.plan, row.start_time) for row in self.conn.execute(query)]

    def set_tenant_plan(self, plan: TenantPlan) -> None:
        self.mark_views([plan.tenant])
        table = tenant_plans
        self.conn.execute(delete(table).where(table.c.tenant == plan.tenant, table.c.start_time == plan.start_ns))
        self.conn.execute(insert(table).values(tenant=plan.tenant, start_time=plan.start_ns, plan=plan.plan))

    # -- budgets, credit, alerts -------------------------------------------------------------------------

    def budget(self, tenant: str) -> Budget | None:
        row = self.conn.execute(select(budgets).where(budgets.c.tenant == tenant)).first()
        if row is None:
            return None
        return Budget(
            tenant=row.tenant,
            limit_micros=row.limit_micros,
            currency=row.currency,
            thresholds=tuple(json.loads(row.thresholds)),
            enforce=bool(row.enforce),
            prepaid=bool(row.prepaid),
            update_ns=row.update_time,
            platform_limit_micros=row.platform_limit_micros,
            platform_enforce=bool(row.platform_enforce),
        )

    def put_budget(self, budget: Budget) -> None:
        self.mark_views([budget.tenant])
        self.conn.execute(delete(budgets).where(budgets.c.tenant == budget.tenant))
        self.conn.execute(
            insert(budgets).values(
                tenant=budget.tenant,
                limit_micros=budget.limit_micros,
                currency=budget.currency,
                thresholds=json.dumps(list(budget.thresholds)),
                enforce=budget.enforce,
                prepaid=budget.prepaid,
                update_time=budget.update_ns,
                platform_limit_micros=budget.platform_limit_micros,
                platform_enforce=budget.platform_enforce,
            )
        )

    def delete_budget(self, tenant: str) -> None:
        self.mark_views([tenant])
        self.conn.execute(delete(budgets).where(budgets.c.tenant == tenant))

    def grants(self, tenant: str) -> list[CreditGrant]:
        """A tenant's credit grants with the credit applied from each, oldest first."""
        applied = (
            select(credit_applications.c.grant_id, func.sum(credit_applications.c.amount_micros).label("applied"))
            .where(credit_applications.c.tenant == tenant)
            .group_by(credit_applications.c.grant_id)
            .subquery()
        )
        query = (
            select(credit_grants, applied.c.applied)
            .outerjoin(applied, applied.c.grant_id == credit_grants.c.grant_id)
            .where(credit_grants.c.tenant == tenant)
            .order_by(credit_grants.c.create_time, credit_grants.c.grant_id)
        )
        return [
            CreditGrant(
                tenant=row.tenant,
                grant_id=row.grant_id,
                amount_micros=row.amount_micros,
                currency=row.currency,
                reason=row.reason,
                expire_ns=row.expire_time,
                create_ns=row.create_time,
                granted_by=row.granted_by,
                applied_micros=int(row.applied or 0),
            )
            for row in self.conn.execute(query)
        ]

    def add_grant(self, grant: CreditGrant) -> None:
        self.mark_views([grant.tenant])
        self.conn.execute(
            insert(credit_grants).values(
                tenant=grant.tenant,
                grant_id=grant.grant_id,
                amount_micros=grant.amount_micros,
                currency=grant.currency,
                reason=grant.reason,
                expire_time=grant.expire_ns,
                create_time=grant.create_ns,
                granted_by=grant.granted_by,
            )
        )

    def alert_exists(self, alert_id: str) -> bool:
        query = select(budget_alerts.c.alert_id).where(budget_alerts.c.alert_id == alert_id)
        return self.conn.execute(query).first() is not None

    def add_alert(self, alert: BudgetAlert) -> bool:
        """Records an alert unless one with its id exists; True when it is new."""
        if self.alert_exists(alert.alert_id):
            return False
        self.conn.execute(
            insert(budget_alerts).values(
                alert_id=alert.alert_id,
                tenant=alert.tenant,
                kind=alert.kind.value,
                threshold=alert.threshold_percent,
                period_start=alert.period_start_ns,
                mtd_micros=alert.month_to_date_micros,
                limit_micros=alert.limit_micros,
                currency=alert.currency,
                time=alert.time_ns,
            )
        )
        return True

    def alerts(self, tenant: str, since_ns: int, offset: int, limit: int) -> list[BudgetAlert]:
        """A tenant's alerts at or after ``since_ns``, newest first."""
        query = (
            select(budget_alerts)
            .where(budget_alerts.c.tenant == tenant, budget_alerts.c.time >= since_ns)
            .order_by(budget_alerts.c.time.desc(), budget_alerts.c.alert_id)
            .offset(offset)
            .limit(limit)
        )
        return [
            BudgetAlert(
                alert_id=row.alert_id,
                tenant=row.tenant,
                kind=AlertKind(row.kind),
                threshold_percent=row.threshold,
                period_start_ns=row.period_start,
                month_to_date_micros=row.mtd_micros,
                limit_micros=row.limit_micros,
                currency=row.currency,
                time_ns=row.time,
            )
            for row in self.conn.execute(query)
        ]

    # -- invoices ----------------------------------------------------------------------------------------

    def invoice(self, invoice_id: str, *, with_lines: bool = True) -> Invoice | None:
        row = self.conn.execute(select(invoices).where(invoices.c.invoice_id == invoice_id)).first()
        return None if row is None else self._invoice_from_row(row, with_lines)

    def invoices(self, tenant: str, state: InvoiceState | None, offset: int, limit: int) -> list[Invoice]:
        """A tenant's invoices without lines, newest period first."""
        query = select(invoices).where(invoices.c.tenant == tenant)
        if state is not None:
            query = query.where(invoices.c.state == state.value)
        query = query.order_by(invoices.c.period_start.desc()).offset(offset).limit(limit)
        return [self._invoice_from_row(row, False) for row in self.conn.execute(query)]

    def _invoice_from_row(self, row: Any, with_lines: bool) -> Invoice:
        lines: tuple[InvoiceLine, ...] = ()
        if with_lines:
            query = select(invoice_lines).where(invoice_lines.c.invoice_id == row.invoice_id)
            lines = tuple(
                InvoiceLine(
                    line_id=line.line_id,
                    kind=LineKind(line.kind),
                    amount_micros=line.amount_micros,
                    description=line.description,
                    meter=line.meter,
                    match=tuple((k, v) for k, v in json.loads(line.match)),
                    tier_index=line.tier_index,
                    quantity_nanos=int(line.quantity_nanos),
                    unit_price_micros=line.unit_price_micros,
                    price_per_quantity_nanos=int(line.price_per_quantity_nanos),
                    event_count=line.event_count,
                    book=line.book,
                    version=line.version,
                )
                for line in self.conn.execute(query.order_by(invoice_lines.c.line_no))
            )
        return Invoice(
            invoice_id=row.invoice_id,
            tenant=row.tenant,
            period_start_ns=row.period_start,
            period_end_ns=row.period_end,
            state=InvoiceState(row.state),
            currency=row.currency,
            plan=row.plan,
            versions=tuple(json.loads(row.versions)),
            lines=lines,
            subtotal_micros=row.subtotal_micros,
            credits_micros=row.credits_micros,
            total_micros=row.total_micros,
            create_ns=row.create_time,
            finalize_ns=row.finalize_time,
        )

    def save_invoice(self, invoice: Invoice) -> None:
        """Writes an invoice and its lines, replacing a draft of the same id (never a finalized one)."""
        existing = self.conn.execute(
            select(invoices.c.state).where(invoices.c.invoice_id == invoice.invoice_id)
        ).first()
        if existing is not None and existing.state == InvoiceState.FINALIZED.value:
            raise AssertionError(f"invoice {invoice.invoice_id} is finalized and immutable")
        values = {
            "tenant": invoice.tenant,
            "period_start": invoice.period_start_ns,
            "period_end": invoice.period_end_ns,
            "state": invoice.state.value,
            "currency": invoice.currency,
            "plan": invoice.plan,
            "versions": json.dumps(list(invoice.versions)),
            "subtotal_micros": invoice.subtotal_micros,
            "credits_micros": invoice.credits_micros,
            "total_micros": invoice.total_micros,
            "create_time": invoice.create_ns,
            "finalize_time": invoice.finalize_ns,
        }
        if existing is None:
            self.conn.execute(insert(invoices).values(invoice_id=invoice.invoice_id, **values))
        else:
            self.conn.execute(update(invoices).where(invoices.c.invoice_id == invoice.invoice_id).values(**values))
            self.conn.execute(delete(invoice_lines).where(invoice_lines.c.invoice_id == invoice.invoice_id))
        if invoice.lines:
            self.conn.execute(
                insert(invoice_lines),
                [
                    {
                        "invoice_id": invoice.invoice_id,
                        "line_no": number,
                        "line_id": line.line_id,
                        "kind": line.kind.value,
                        "meter": line.meter,
                        "match": json.dumps([list(pair) for pair in line.match]),
                        "tier_index": line.tier_index,
                        "quantity_nanos": str(line.quantity_nanos),
                        "unit_price_micros": line.unit_price_micros,
                        "price_per_quantity_nanos": str(line.price_per_quantity_nanos),
                        "amount_micros": line.amount_micros,
                        "event_count": line.event_count,
                        "description": line.description,
                        "book": line.book,
                        "version": line.version,
                    }
                    for number, line in enumerate(invoice.lines)
                ],
            )

    def apply_credit(self, invoice_id: str, tenant: str, grant_id: str, amount_micros: int, now_ns: int) -> None:
        self.mark_views([tenant])
        self.conn.execute(
            insert(credit_applications).values(
                invoice_id=invoice_id, tenant=tenant, grant_id=grant_id, amount_micros=amount_micros, time=now_ns
            )
        )
