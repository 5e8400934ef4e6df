"""Pricing a tenant's month of usage: effective-dated price books, graduated tiers with a free quantity, and the
rounding rule.

Usage arrives as hourly cells (one per meter and dimension set, from the store's rollups). Cells are priced in
order of hour, then dimension set; each price entry (meter and match) has one cumulative position in the month,
so the free quantity and tier bounds count from the first of the month, across price book versions. A cell that
crosses a tier bound is split exactly by quantity; its events are counted on the line their quantity begins on
(which needs that cell's events, in time order, from ``cell_events``). The same walk answers where one event's
usage fell (its attribution).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from services.billing.core.meters import meter_order
from services.billing.core.model import DEFAULT_PLAN, Match, MeterPrice, Plan, PriceBook, Segment
from services.billing.core.quantities import format_nanos, line_amount_micros
from services.mesh.errors import FailedPrecondition

__all__ = ["Cell", "PricedPlan", "PriceResolver", "PricedLine", "MonthPricer", "describe_match"]


class Cell(NamedTuple):
    """Usage of one meter and dimension set in one hour (or, aggregated, over a stretch of hours)."""

    hour_ns: int
    meter: str
    dims_id: int
    dims: Mapping[str, str]
    quantity_nanos: int
    event_count: int

    @property
    def order(self) -> tuple[int, int]:
        return (self.hour_ns, self.dims_id)


@dataclass(frozen=True)
class PricedPlan:
    """The plan in effect at some hour, and the book version it comes from."""

    book: str
    version: int
    currency: str
    plan: Plan


class PriceResolver:
    """Which plan of which book version prices a tenant's usage at a given time.

    The tenant's own book applies from its first version's effective time; before that, the platform default.
    Within a book, the version with the latest effective time at or before the moment applies.
    """

    def __init__(self, books: Sequence[PriceBook], tenant: str, plan_name: str) -> None:
        key = lambda b: (b.effective_ns, b.version)  # noqa: E731
        self._own = sorted((b for b in books if b.tenant == tenant and tenant), key=key)
        self._default = sorted((b for b in books if not b.tenant), key=key)
        self._plan_name = plan_name
        self._memo: dict[int, PricedPlan] = {}

    @staticmethod
    def _latest(books: Sequence[PriceBook], at_ns: int) -> PriceBook | None:
        found = None
        for book in books:
            if book.effective_ns <= at_ns:
                found = book
        return found

    def change_points(self, start_ns: int, end_ns: int) -> list[int]:
        """Times in (start_ns, end_ns) where the plan in effect may change (book versions taking effect)."""
        return sorted({b.effective_ns for b in (*self._own, *self._default) if start_ns < b.effective_ns < end_ns})

    def book_at(self, at_ns: int) -> PriceBook | None:
        return self._latest(self._own, at_ns) or self._latest(self._default, at_ns)

    def at(self, at_ns: int) -> PricedPlan:
        hit = self._memo.get(at_ns)
        if hit is not None:
            return hit
        book = self.book_at(at_ns)
        if book is None:
            raise FailedPrecondition("no price book is in effect for this period")
        plan = book.plan(self._plan_name) or book.plan(DEFAULT_PLAN)
        if plan is None:  # pragma: no cover - every stored book has the default plan
            raise FailedPrecondition(f"price book version {book.version} has no plan {self._plan_name!r}")
        priced = PricedPlan(book.tenant, book.version, book.currency, plan)
        self._memo[at_ns] = priced
        return priced


@dataclass
class PricedLine:
    """One usage line: a tier (or the free quantity) of one price entry in one book version."""

    book: str
    version: int
    meter: str
    match: Match
    segment: Segment
    quantity_nanos: int = 0
    event_count: int = 0

    @property
    def amount_micros(self) -> int:
        return line_amount_micros(
            self.quantity_nanos, self.segment.unit_price_micros, self.segment.price_per_quantity_nanos
        )

    @property
    def key(self) -> tuple[str, int, str, Match, int]:
        return (self.book, self.version, self.meter, self.match, self.segment.tier_index)

    def description(self) -> str:
        segment = self.segment
        scope = f"{self.meter} ({describe_match(self.match)})"
        if segment.tier_index < 0:
            return f"{scope}: free quantity, up to {format_nanos(segment.high or 0)}"
        upper = "and above" if segment.high is None else f"to {format_nanos(segment.high)}"
        return f"{scope}: tier {segment.tier_index + 1}, from {format_nanos(segment.low)} {upper}"


def describe_match(match: Match) -> str:
    """ "gpu_type=nvidia-a100-80gb" or "all" for a catch-all entry."""
    return ", ".join(f"{k}={v}" for k, v in match) or "all"


@dataclass
class MonthPricer:
    """Walks a month's cells in order and accumulates priced lines (see the module docstring)."""

    resolver: PriceResolver
    cell_events: Callable[[Cell], list[int]]
    _positions: dict[tuple[str, Match], int] = field(default_factory=dict)
    _lines: dict[tuple[str, int, str, Match, int], PricedLine] = field(default_factory=dict)
    _segments: dict[int, list[Segment]] = field(default_factory=dict)
    _entries: dict[tuple[int, str, int], MeterPrice] = field(default_factory=dict)

    def entry(self, cell: Cell) -> tuple[PricedPlan, MeterPrice]:
        priced = self.resolver.at(cell.hour_ns)
        key = (id(priced.plan), cell.meter, cell.dims_id)
        price = self._entries.get(key)
        if price is None:
            price = priced.plan.price_for(cell.meter, cell.dims)
            if price is None:  # pragma: no cover - every stored plan prices every meter with a catch-all
                raise FailedPrecondition(f"plan {priced.plan.name!r} has no price for meter {cell.meter!r}")
            self._entries[key] = price
        return priced, price

    def reaches_bound(self, cell: Cell) -> bool:
        """Whether the cell's stretch of its entry's month position reaches a tier bound (then its events must
        be counted one by one, in order)."""
        _, price = self.entry(cell)
        start = self._positions.get((cell.meter, price.match), 0)
        end = start + cell.quantity_nanos
        return any(start < segment.low <= end for segment in self.segments(price))

    def segments(self, price: MeterPrice) -> list[Segment]:
        found = self._segments.get(id(price))
        if found is None:
            found = self._segments[id(price)] = price.segments()
        return found

    def position(self, cell: Cell) -> int:
        """The month's cumulative quantity of the cell's price entry before the cell."""
        _, price = self.entry(cell)
        return self._positions.get((cell.meter, price.match), 0)

    def locate(self, cell: Cell, position: int) -> PricedLine:
        """The line holding a cumulative position of the cell's price entry (created empty if new)."""
        priced, price = self.entry(cell)
        segment = next(s for s in self.segments(price) if s.holds(position))
        return self._line(priced, price, cell.meter, segment)

    def spans(self, cell: Cell, start: int, end: int) -> list[tuple[PricedLine, int]]:
        """The lines a stretch [start, end) of the cell's price entry falls on, with the quantity on each."""
        priced, price = self.entry(cell)
        out = []
        for segment in self.segments(price):
            low = max(segment.low, start)
            high = end if segment.high is None else min(segment.high, end)
            if high > low:
                out.append((self._line(priced, price, cell.meter, segment), high - low))
        return out

    def _line(self, priced: PricedPlan, price: MeterPrice, meter: str, segment: Segment) -> PricedLine:
        key = (priced.book, priced.version, meter, price.match, segment.tier_index)
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = PricedLine(priced.book, priced.version, meter, price.match, segment)
        return line

    def add(self, cell: Cell) -> None:
        priced, price = self.entry(cell)
        ident = (cell.meter, price.match)
        start = self._positions.get(ident, 0)
        end = start + cell.quantity_nanos
        segments = self.segments(price)
        for segment in segments:
            low = max(segment.low, start)
            high = end if segment.high is None else min(segment.high, end)
            if high > low:
                self._line(priced, price, cell.meter, segment).quantity_nanos += high - low
        if any(start < segment.low <= end for segment in segments):
            # The cell reaches a tier bound: count each event on the tier its quantity begins in.
            position = start
            for quantity in self.cell_events(cell):
                segment = next(s for s in segments if s.holds(position))
                self._line(priced, price, cell.meter, segment).event_count += 1
                position += quantity
        else:
            segment = next(s for s in segments if s.holds(start))
            self._line(priced, price, cell.meter, segment).event_count += cell.event_count
        self._positions[ident] = end

    def add_all(self, cells: Iterable[Cell]) -> MonthPricer:
        for cell in sorted(cells, key=lambda c: c.order):
            self.add(cell)
        return self

    def lines(self) -> list[PricedLine]:
        """Lines with usage, by meter (documented order), then match, version and tier."""
        lines = [line for line in self._lines.values() if line.quantity_nanos or line.event_count]
        return sorted(lines, key=lambda x: (meter_order(x.meter), x.meter, x.match, x.book, x.version, x.segment.low))

    def usage_total_micros(self) -> int:
        return sum(line.amount_micros for line in self.lines())
