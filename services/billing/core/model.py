"""The billing domain's values: usage events and their outcomes, price books, budgets, credit, invoices.

Times are integer nanoseconds since the epoch (UTC), quantities integer nanos of a unit, money integer micros.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Generic, NamedTuple, TypeVar

__all__ = [
    "EventStatus",
    "UsageEvent",
    "EventResult",
    "LedgerEntry",
    "RecordedEvent",
    "Segment",
    "PriceTier",
    "MeterPrice",
    "PlanKind",
    "Plan",
    "PriceBook",
    "TenantPlan",
    "Budget",
    "CreditGrant",
    "Balance",
    "BudgetCheck",
    "AlertKind",
    "BudgetAlert",
    "LineKind",
    "InvoiceState",
    "InvoiceLine",
    "Invoice",
    "UsageBucket",
    "Attribution",
    "Page",
    "Window",
    "Aggregation",
    "UsageQuery",
    "Match",
    "DEFAULT_PLAN",
    "DEFAULT_THRESHOLDS",
]

_T = TypeVar("_T")
_NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})

#: A price entry's attribute match, as sorted (key, value) pairs.
Match = tuple[tuple[str, str], ...]

#: The plan of tenants that were never put on one; every price book has it.
DEFAULT_PLAN = "on-demand"
#: Budget alert thresholds (percent of the monthly limit) when none are given.
DEFAULT_THRESHOLDS = (80, 100)


class EventStatus(enum.Enum):
    """Outcome of one event of a RecordUsage batch."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


# The per-event types are NamedTuples: they are built by the hundred thousand per second on the ingest path,
# and a NamedTuple is several times cheaper to create than a frozen dataclass.


class UsageEvent(NamedTuple):
    """A usage event as an emitter sent it (quantity still a decimal string)."""

    source: str
    id: str
    tenant: str
    meter: str
    quantity: str
    time_ns: int
    attributes: Mapping[str, str] = _NO_ATTRIBUTES


class EventResult(NamedTuple):
    """What happened to one event of a batch."""

    source: str
    id: str
    status: EventStatus
    reason: str = ""


class LedgerEntry(NamedTuple):
    """A validated event, ready for the ledger: exact quantity, canonical attributes, compact dedup key."""

    key_hash: int
    source: str
    id: str
    tenant: str
    meter: str
    quantity_nanos: int
    time_ns: int
    #: Canonical JSON of all attributes / of the dimension attributes only.
    attributes_json: str
    dims_json: str


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as the ledger holds it."""

    seq: int
    source: str
    id: str
    tenant: str
    meter: str
    quantity_nanos: int
    time_ns: int
    attributes_json: str
    dims_id: int
    record_time_ns: int


@dataclass(frozen=True)
class Segment:
    """One stretch of a month's cumulative quantity with one price: [low, high) nanos (high None: unbounded)."""

    low: int
    high: int | None
    tier_index: int
    unit_price_micros: int
    price_per_quantity_nanos: int

    def holds(self, position: int) -> bool:
        return self.low <= position and (self.high is None or position < self.high)


@dataclass(frozen=True)
class PriceTier:
    """Units up to ``up_to_nanos`` (cumulative in the month, None: unbounded) cost unit_price per quantity."""

    up_to_nanos: int | None
    unit_price_micros: int
    price_per_quantity_nanos: int


@dataclass(frozen=True)
class MeterPrice:
    """The price of a meter for events whose dimensions include ``match``."""

    meter: str
    match: Match
    free_nanos: int
    tiers: tuple[PriceTier, ...]

    def matches(self, dims: Mapping[str, str]) -> bool:
        return all(dims.get(key) == value for key, value in self.match)

    def segments(self) -> list[Segment]:
        """The free quantity (tier -1) and the tiers as consecutive segments of the month's quantity."""
        out = []
        low = 0
        if self.free_nanos:
            out.append(Segment(0, self.free_nanos, -1, 0, 1))
            low = self.free_nanos
        for index, tier in enumerate(self.tiers):
            out.append(Segment(low, tier.up_to_nanos, index, tier.unit_price_micros, tier.price_per_quantity_nanos))
            if tier.up_to_nanos is None:
                break
            low = tier.up_to_nanos
        return out


class PlanKind(enum.Enum):
    ON_DEMAND = "on_demand"
    COMMITTED = "committed"


@dataclass(frozen=True)
class Plan:
    """A named set of meter prices; committed plans also charge a monthly minimum."""

    name: str
    kind: PlanKind
    prices: tuple[MeterPrice, ...]
    monthly_commitment_micros: int = 0
    description: str = ""

    def price_for(self, meter: str, dims: Mapping[str, str]) -> MeterPrice | None:
        """The most specific entry of ``meter`` whose match the dimensions satisfy (first one on ties)."""
        best: MeterPrice | None = None
        for price in self.prices:
            if price.meter == meter and price.matches(dims) and (best is None or len(price.match) > len(best.match)):
                best = price
        return best


@dataclass(frozen=True)
class PriceBook:
    """One immutable, effective-dated version of a book (``tenant`` empty: the platform default)."""

    tenant: str
    version: int
    currency: str
    plans: tuple[Plan, ...]
    effective_ns: int
    create_ns: int = 0

    def plan(self, name: str) -> Plan | None:
        return next((p for p in self.plans if p.name == name), None)


@dataclass(frozen=True)
class TenantPlan:
    tenant: str
    plan: str
    start_ns: int


@dataclass(frozen=True)
class Budget:
    """A tenant's monthly budget; ``limit_micros`` None: no limit (thresholds and flags still kept)."""

    tenant: str
    limit_micros: int | None
    currency: str
    thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS
    enforce: bool = False
    prepaid: bool = False
    update_ns: int = 0
    #: The monthly limit (None: none) and enforcement the platform set; the tenant may tighten, never loosen them.
    platform_limit_micros: int | None = None
    platform_enforce: bool = False


@dataclass(frozen=True)
class CreditGrant:
    tenant: str
    grant_id: str
    amount_micros: int
    currency: str
    reason: str
    expire_ns: int | None
    create_ns: int
    granted_by: str
    applied_micros: int = 0

    def available(self, now_ns: int) -> int:
        """Credit left on this grant at ``now_ns`` (zero once expired)."""
        if self.expire_ns is not None and self.expire_ns <= now_ns:
            return 0
        return self.amount_micros - self.applied_micros


@dataclass(frozen=True)
class Balance:
    tenant: str
    currency: str
    credit_micros: int
    month_to_date_micros: int
    budget: Budget | None
    remaining_budget_micros: int | None
    plan: str
    as_of_ns: int


@dataclass(frozen=True)
class BudgetCheck:
    allowed: bool
    remaining_micros: int | None
    currency: str
    reason: str
    as_of_ns: int


class AlertKind(enum.Enum):
    THRESHOLD = "threshold"
    CREDIT_EXHAUSTED = "credit_exhausted"


@dataclass(frozen=True)
class BudgetAlert:
    alert_id: str
    tenant: str
    kind: AlertKind
    threshold_percent: int
    period_start_ns: int
    month_to_date_micros: int
    limit_micros: int | None
    currency: str
    time_ns: int


class LineKind(enum.Enum):
    USAGE = "usage"
    COMMITMENT_SHORTFALL = "commitment_shortfall"
    CREDIT = "credit"


class InvoiceState(enum.Enum):
    DRAFT = "draft"
    FINALIZED = "finalized"


@dataclass(frozen=True)
class InvoiceLine:
    line_id: str
    kind: LineKind
    amount_micros: int
    description: str
    meter: str = ""
    match: Match = ()
    tier_index: int = 0
    quantity_nanos: int = 0
    unit_price_micros: int = 0
    price_per_quantity_nanos: int = 0
    event_count: int = 0
    book: str = ""
    version: int = 0


@dataclass(frozen=True)
class Invoice:
    invoice_id: str
    tenant: str
    period_start_ns: int
    period_end_ns: int
    state: InvoiceState
    currency: str
    plan: str
    versions: tuple[int, ...]
    lines: tuple[InvoiceLine, ...]
    subtotal_micros: int
    credits_micros: int
    total_micros: int
    create_ns: int
    finalize_ns: int | None = None


class Window(enum.Enum):
    """Time buckets of a usage query (UTC); WHOLE is one bucket for the whole range."""

    WHOLE = "whole"
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


class Aggregation(enum.Enum):
    SUM = "sum"
    COUNT = "count"
    MAX = "max"


@dataclass(frozen=True)
class UsageQuery:
    """Aggregate one meter's usage over [start_ns, end_ns) (tenant None: every tenant; end None: now)."""

    tenant: str | None
    meter: str
    window: Window = Window.WHOLE
    aggregation: Aggregation = Aggregation.SUM
    group_by: tuple[str, ...] = ()
    filter: Mapping[str, str] = field(default_factory=dict)
    start_ns: int = 0
    end_ns: int | None = None
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class UsageBucket:
    """One aggregate of a usage query: a time window and a group of attribute values."""

    start_ns: int
    end_ns: int
    group: Mapping[str, str]
    #: The aggregate as a decimal string (SUM and MAX in units of the meter, COUNT a count).
    value: str
    event_count: int


@dataclass(frozen=True)
class Attribution:
    """A recorded event and where its cost went."""

    event: RecordedEvent
    invoice_id: str = ""
    line_id: str = ""
    cost_micros: int | None = None
    currency: str = ""


@dataclass(frozen=True)
class Page(Generic[_T]):
    items: list[_T]
    next_token: str = ""
