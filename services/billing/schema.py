"""The billing database: its tables and the migrations that create and evolve them (the store reads and writes
them; tests read them directly)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    text,
    update,
)
from sqlalchemy.engine import Connection

from services.mesh.db import Migration

__all__ = [
    "metadata",
    "usage_events",
    "usage_dimensions",
    "usage_rollups",
    "price_books",
    "tenant_plans",
    "budgets",
    "credit_grants",
    "credit_applications",
    "budget_alerts",
    "invoices",
    "invoice_lines",
    "view_marks",
    "MIGRATIONS",
]

metadata = MetaData()
# SQLite only makes INTEGER PRIMARY KEY the rowid (append order, no separate index); elsewhere a BIGINT identity.
_SEQ = BigInteger().with_variant(Integer, "sqlite")

usage_events = Table(
    "billing_usage_events",
    metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=True),
    Column("key_hash", BigInteger, nullable=False),
    Column("source", String(64), nullable=False),
    Column("event_id", String(200), nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("meter", String(64), nullable=False),
    Column("quantity_nanos", BigInteger, nullable=False),
    Column("event_time", BigInteger, nullable=False),
    Column("dims_id", Integer, nullable=False),
    Column("attributes", Text, nullable=False),
    Column("record_time", BigInteger, nullable=False),
    Index("ix_billing_usage_events_key", "key_hash"),
    Index("ix_billing_usage_events_tenant_meter_time", "tenant", "meter", "event_time"),
)

usage_dimensions = Table(
    "billing_usage_dimensions",
    metadata,
    Column("dims_id", Integer, primary_key=True, autoincrement=True),
    # SHA-256 of the canonical JSON: a bounded-size unique key (PostgreSQL limits index entries).
    Column("dims_key", String(64), nullable=False, unique=True),
    Column("dims", Text, nullable=False),
)

# Sums are kept as whole units plus nanos, each growing by less than 10**9 per event, so a cell would need
# billions of events in one hour to overflow 64 bits.
usage_rollups = Table(
    "billing_usage_rollups",
    metadata,
    Column("tenant", String(64), nullable=False),
    Column("hour", BigInteger, nullable=False),
    Column("meter", String(64), nullable=False),
    Column("dims_id", Integer, nullable=False),
    Column("sum_units", BigInteger, nullable=False),
    Column("sum_nanos", BigInteger, nullable=False),
    Column("event_count", BigInteger, nullable=False),
    Column("max_nanos", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant", "hour", "meter", "dims_id"),
)

price_books = Table(
    "billing_price_books",
    metadata,
    Column("book", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("effective_time", BigInteger, nullable=False),
    Column("create_time", BigInteger, nullable=False),
    Column("body", Text, nullable=False),
    PrimaryKeyConstraint("book", "version"),
)

tenant_plans = Table(
    "billing_tenant_plans",
    metadata,
    Column("tenant", String(64), nullable=False),
    Column("start_time", BigInteger, nullable=False),
    Column("plan", String(64), nullable=False),
    PrimaryKeyConstraint("tenant", "start_time"),
)

budgets = Table(
    "billing_budgets",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("limit_micros", BigInteger),
    Column("currency", String(3), nullable=False),
    Column("thresholds", Text, nullable=False),
    Column("enforce", Boolean, nullable=False),
    Column("prepaid", Boolean, nullable=False),
    Column("update_time", BigInteger, nullable=False),
    # The monthly limit and enforcement the platform set: a tenant may tighten them, never loosen them.
    Column("platform_limit_micros", BigInteger),
    Column("platform_enforce", Boolean, nullable=False, default=False),
)

credit_grants = Table(
    "billing_credit_grants",
    metadata,
    Column("tenant", String(64), nullable=False),
    Column("grant_id", String(100), nullable=False),
    Column("amount_micros", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("reason", String(200), nullable=False),
    Column("expire_time", BigInteger),
    Column("create_time", BigInteger, nullable=False),
    Column("granted_by", String(200), nullable=False),
    PrimaryKeyConstraint("tenant", "grant_id"),
)

credit_applications = Table(
    "billing_credit_applications",
    metadata,
    Column("invoice_id", String(120), nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("grant_id", String(100), nullable=False),
    Column("amount_micros", BigInteger, nullable=False),
    Column("time", BigInteger, nullable=False),
    PrimaryKeyConstraint("invoice_id", "grant_id"),
    Index("ix_billing_credit_applications_grant", "tenant", "grant_id"),
)

budget_alerts = Table(
    "billing_budget_alerts",
    metadata,
    Column("alert_id", String(160), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("threshold", Integer, nullable=False),
    Column("period_start", BigInteger, nullable=False),
    Column("mtd_micros", BigInteger, nullable=False),
    Column("limit_micros", BigInteger),
    Column("currency", String(3), nullable=False),
    Column("time", BigInteger, nullable=False),
    Index("ix_billing_budget_alerts_tenant_time", "tenant", "time"),
)

invoices = Table(
    "billing_invoices",
    metadata,
    Column("invoice_id", String(120), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("period_start", BigInteger, nullable=False),
    Column("period_end", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("plan", String(64), nullable=False),
    Column("versions", Text, nullable=False),
    Column("subtotal_micros", BigInteger, nullable=False),
    Column("credits_micros", BigInteger, nullable=False),
    Column("total_micros", BigInteger, nullable=False),
    Column("create_time", BigInteger, nullable=False),
    Column("finalize_time", BigInteger),
    UniqueConstraint("tenant", "period_start", name="uq_billing_invoices_tenant_period"),
)

invoice_lines = Table(
    "billing_invoice_lines",
    metadata,
    Column("invoice_id", String(120), nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("line_id", String(16), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("meter", String(64), nullable=False),
    Column("match", Text, nullable=False),
    Column("tier_index", Integer, nullable=False),
    # Decimal strings of nanos: a month's quantity may exceed 64 bits of nanos.
    Column("quantity_nanos", Text, nullable=False),
    Column("unit_price_micros", BigInteger, nullable=False),
    Column("price_per_quantity_nanos", Text, nullable=False),
    Column("amount_micros", BigInteger, nullable=False),
    Column("event_count", BigInteger, nullable=False),
    Column("description", Text, nullable=False),
    Column("book", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    PrimaryKeyConstraint("invoice_id", "line_no"),
)


#: When a tenant's budget view last changed (its usage, budget, credit, plan; budgets.ALL_TENANTS: a price book),
#: written in the transaction that changed it: every replica reads it to refresh the views it holds
#: (BillingCore.refresh_budgets).
view_marks = Table(
    "billing_view_marks",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("changed_time", BigInteger, nullable=False),
)


def _platform_budget_bounds(conn: Connection) -> None:
    """Adds the platform's bounds to budgets. Nobody recorded who set an existing budget, so its limit and enforcement
    become the platform's: tenants may still lower them, and raising them takes the platform, as for new ones."""
    present = {column["name"] for column in inspect(conn).get_columns("billing_budgets")}
    if "platform_limit_micros" not in present:  # databases made by migration 1 before these columns existed
        conn.execute(text("ALTER TABLE billing_budgets ADD COLUMN platform_limit_micros BIGINT"))
        conn.execute(text("ALTER TABLE billing_budgets ADD COLUMN platform_enforce BOOLEAN NOT NULL DEFAULT FALSE"))
    existing = budgets.c
    conn.execute(update(budgets).values(platform_limit_micros=existing.limit_micros, platform_enforce=existing.enforce))


MIGRATIONS = [
    Migration(1, "billing: ledger, rollups, price books, budgets, credit, alerts, invoices", metadata.create_all),
    Migration(2, "billing: budgets keep the limit and enforcement the platform set", _platform_budget_bounds),
    Migration(
        3,
        "billing: marks of changed budget views, for replicas",
        lambda conn: metadata.create_all(conn, tables=[view_marks]),
    ),
]
