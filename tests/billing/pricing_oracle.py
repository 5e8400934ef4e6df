"""An independent price calculator for tests: raw events + a price book message -> expected usage lines,
with Fraction arithmetic and Python's round (half to even). It shares no code with the service's pricing."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from services.gen.aidc.billing.v1 import billing_service_pb2 as pb

REFERENCES = ("request_id", "trace_id")


@dataclass(frozen=True)
class RawEvent:
    meter: str
    quantity: str
    attributes: Mapping[str, str]


def _entry(plan: pb.Plan, meter: str, attributes: Mapping[str, str]) -> pb.MeterPrice:
    dims = {k: v for k, v in attributes.items() if k not in REFERENCES}
    candidates = [p for p in plan.prices if p.meter == meter and all(dims.get(k) == v for k, v in p.match.items())]
    return max(candidates, key=lambda p: len(p.match))  # max() keeps the first of equals, like the service


def expected_lines(
    book: pb.PriceBook, plan_name: str, events: Iterable[RawEvent]
) -> dict[tuple[str, tuple[tuple[str, str], ...], int], tuple[Fraction, int]]:
    """(meter, match, tier index or -1 for free) -> (quantity, amount in micros) for one month of events."""
    plan = next(p for p in book.plans if p.name == plan_name)
    totals: dict[tuple[str, tuple[tuple[str, str], ...]], Fraction] = defaultdict(Fraction)
    entries = {}
    for event in events:
        entry = _entry(plan, event.meter, event.attributes)
        key = (event.meter, tuple(sorted(entry.match.items())))
        totals[key] += Fraction(event.quantity)
        entries[key] = entry
    out = {}
    for key, total in totals.items():
        entry = entries[key]
        low = Fraction(entry.free_quantity or "0")
        if low:
            out[(*key, -1)] = (min(total, low), 0)
        for index, tier in enumerate(entry.tiers):
            high = Fraction(tier.up_to) if tier.up_to else None
            piece = (total if high is None else min(total, high)) - low
            if piece > 0:
                per = Fraction(tier.price_per_quantity or "1")
                out[(*key, index)] = (piece, round(piece / per * tier.unit_price.micros))
            if high is None or total <= high:
                break
            low = high
    return out
