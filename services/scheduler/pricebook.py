"""Pool prices -> billing's price book: what a pool charges per resource-hour is what billing invoices.

The scheduler's usage events carry the attributes ``pool`` and ``node``. When an operator sets prices on a pool or
a node, the scheduler writes a new version of the platform default price book (as that operator, who holds
pricebook:write), in which every plan gets entries matching ``pool`` (and ``node`` for a node with its own prices)
for cpu_core_seconds, memory_gib_seconds and gpu_seconds (by ``gpu_type``). Entries are written only where the
price differs from what the book charges anyway, so the default pool at the seeded prices changes nothing: its
usage falls to the book's catch-all prices, free core-hours included. Each plan keeps its discount: a plan whose
catch-all price is 75% of on-demand's gets 75% of the pool's price. Billing applies a new version from the next
whole hour; until then the previous prices are billed. Tenants with a price book of their own keep it (operators
price pools there by hand).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from services.billing.client import BillingClient
from services.gen.aidc.billing.v1 import billing_service_pb2 as billing_pb
from services.gen.aidc.common.v1 import common_pb2
from services.scheduler.core import Prices
from services.scheduler.domain.model import NodeRecord, PoolRecord

__all__ = ["PriceBookSync", "priced_book", "MANAGED_KEYS"]

log = logging.getLogger(__name__)

#: Entries whose match names one of these are the scheduler's (rewritten on every sync).
MANAGED_KEYS = ("pool", "node")
_DEFAULT_PLAN = "on-demand"
_SECONDS_PER_HOUR = 3600


def _hourly(price: billing_pb.MeterPrice) -> Fraction:
    """The entry's price per hour of the unit (its first tier's), as an exact fraction of micros."""
    if not price.tiers:
        return Fraction(0)
    tier = price.tiers[0]
    per = Fraction(Decimal(tier.price_per_quantity or "1"))
    return Fraction(tier.unit_price.micros) * _SECONDS_PER_HOUR / per


def _best(plan: billing_pb.Plan, meter: str, dims: dict[str, str]) -> billing_pb.MeterPrice | None:
    """The most specific unmanaged entry of ``meter`` matching ``dims`` (billing's rule)."""
    best = None
    for price in plan.prices:
        if price.meter != meter or any(k in MANAGED_KEYS for k in price.match):
            continue
        if all(dims.get(k) == v for k, v in price.match.items()) and (
            best is None or len(price.match) > len(best.match)
        ):
            best = price
    return best


def _round(value: Fraction) -> int:
    return round(value)  # Fraction rounds half to even


def _wanted(prices: Prices) -> list[tuple[str, dict[str, str], int]]:
    """(meter, extra match, hourly micros) of a price set."""
    out: list[tuple[str, dict[str, str], int]] = [
        ("cpu_core_seconds", {}, prices.cpu_core_hour_micros),
        ("memory_gib_seconds", {}, prices.memory_gib_hour_micros),
    ]
    for gpu_type, micros in sorted(prices.gpu_hour_micros.items()):
        out.append(("gpu_seconds", {} if gpu_type == "*" else {"gpu_type": gpu_type}, micros))
    return out


def priced_book(
    book: billing_pb.PriceBook, pools: Sequence[PoolRecord], nodes: Sequence[NodeRecord]
) -> billing_pb.PriceBook:
    """``book`` with the scheduler's entries replaced by the ones ``pools`` and ``nodes`` need."""
    new = billing_pb.PriceBook(tenant=book.tenant, currency=book.currency)
    on_demand = next((p for p in book.plans if p.name == _DEFAULT_PLAN), book.plans[0] if book.plans else None)
    scopes: list[tuple[dict[str, str], Prices, Prices | None]] = [({"pool": p.name}, p.prices, None) for p in pools]
    by_pool = {p.name: p for p in pools}
    for node in nodes:
        if node.prices is not None and node.pool in by_pool:
            scopes.append(({"pool": node.pool, "node": node.name}, node.prices, by_pool[node.pool].prices))
    for plan in book.plans:
        copy = new.plans.add()
        copy.CopyFrom(plan)
        del copy.prices[:]
        copy.prices.extend(p for p in plan.prices if not any(k in MANAGED_KEYS for k in p.match))
        if on_demand is None:
            continue
        for scope, prices, parent in scopes:
            for meter, extra, micros in _wanted(prices):
                dims = {**scope, **extra}
                base = _best(on_demand, meter, dims)
                list_price = _hourly(base) if base is not None else Fraction(0)
                inherited = dict(((m, tuple(e.items())), v) for m, e, v in _wanted(parent)) if parent else {}
                charged = inherited.get((meter, tuple(extra.items())), list_price)
                if Fraction(micros) == charged:
                    continue  # what the book (or the node's pool entry) charges already: nothing to add
                own = _best(plan, meter, dims)
                factor = _hourly(own) / list_price if own is not None and list_price else Fraction(1)
                entry = copy.prices.add(meter=meter, match=dims)
                entry.tiers.add(
                    unit_price=common_pb2.Money(micros=_round(micros * factor), currency=book.currency),
                    price_per_quantity=str(_SECONDS_PER_HOUR),
                )
    return new


def _canonical(plan: billing_pb.Plan) -> tuple[object, ...]:
    """A plan's prices as billing compares them: entries unordered, decimals by value."""

    def number(text: str, default: str) -> Decimal:
        return Decimal(text or default).normalize()

    entries = frozenset(
        (
            price.meter,
            tuple(sorted(price.match.items())),
            number(price.free_quantity, "0"),
            tuple((number(t.up_to, "-1"), t.unit_price.micros, number(t.price_per_quantity, "1")) for t in price.tiers),
        )
        for price in plan.prices
    )
    return (plan.name, plan.kind, plan.monthly_commitment.micros, entries)


class PriceBookSync:
    """Writes the price book version the pools need, as the calling operator (a no-op when nothing changes)."""

    def __init__(self, billing: BillingClient) -> None:
        self._billing = billing

    async def sync(self, pools: Sequence[PoolRecord], nodes: Sequence[NodeRecord]) -> None:
        # The latest version, also one not yet in effect (a change already scheduled must not be lost).
        current = await self._billing.get_price_book(tenant="", at=datetime.now(UTC) + timedelta(days=3660))
        wanted = priced_book(current, pools, nodes)
        if [_canonical(p) for p in wanted.plans] == [_canonical(p) for p in current.plans]:
            return
        stored = await self._billing.set_price_book(wanted)
        log.info("price book version %d carries the pools' prices from %s", stored.version, stored.effective_time)
