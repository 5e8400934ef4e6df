"""Price book rules (what a valid book is) and the platform's default book, seeded on first start."""

from __future__ import annotations

import re

from services.billing.core.meters import METERS, REFERENCE_ATTRIBUTES
from services.billing.core.model import DEFAULT_PLAN, MeterPrice, Plan, PlanKind, PriceBook, PriceTier
from services.billing.core.quantities import NANOS
from services.mesh.errors import InvalidArgument

__all__ = ["validate_price_book", "default_price_book", "CURRENCY"]

#: An ISO 4217 code.
CURRENCY = re.compile(r"[A-Z]{3}")
_PLAN_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
_MAX_PLANS = 32
_MAX_PRICES = 256


def validate_price_book(book: PriceBook, platform_currency: str) -> None:
    """InvalidArgument unless ``book`` is a complete, consistent price book in the platform currency."""
    if book.currency != platform_currency:
        raise InvalidArgument(f"currency {book.currency!r} is not the platform currency {platform_currency}")
    if not book.plans or len(book.plans) > _MAX_PLANS:
        raise InvalidArgument(f"a price book has 1-{_MAX_PLANS} plans")
    names = [plan.name for plan in book.plans]
    if len(set(names)) != len(names):
        raise InvalidArgument("plan names must be unique")
    if DEFAULT_PLAN not in names:
        raise InvalidArgument(f"a price book needs an {DEFAULT_PLAN!r} plan (the plan of tenants without one)")
    for plan in book.plans:
        _validate_plan(plan)


def _validate_plan(plan: Plan) -> None:
    where = f"plan {plan.name!r}"
    if not _PLAN_NAME.fullmatch(plan.name):
        raise InvalidArgument(f"plan name {plan.name!r} must be lowercase letters, digits and '-'")
    if plan.kind is PlanKind.COMMITTED and plan.monthly_commitment_micros <= 0:
        raise InvalidArgument(f"{where}: a committed plan needs a positive monthly_commitment")
    if plan.kind is PlanKind.ON_DEMAND and plan.monthly_commitment_micros:
        raise InvalidArgument(f"{where}: an on-demand plan has no monthly_commitment")
    if len(plan.prices) > _MAX_PRICES:
        raise InvalidArgument(f"{where}: at most {_MAX_PRICES} prices")
    seen = set()
    for price in plan.prices:
        if price.meter not in METERS:
            raise InvalidArgument(f"{where}: unknown meter {price.meter!r}")
        if (price.meter, price.match) in seen:
            raise InvalidArgument(f"{where}: two prices for {price.meter} with the same match")
        seen.add((price.meter, price.match))
        for key, _ in price.match:
            if key in REFERENCE_ATTRIBUTES:
                raise InvalidArgument(f"{where}: {key} names single events and cannot be matched on")
        _validate_tiers(f"{where}, {price.meter}", price)
    unpriced = [m for m in METERS if (m, ()) not in seen]
    if unpriced:
        raise InvalidArgument(f"{where}: needs a catch-all price (empty match) for {', '.join(unpriced)}")


def _validate_tiers(where: str, price: MeterPrice) -> None:
    if not price.tiers:
        raise InvalidArgument(f"{where}: at least one tier")
    bound = price.free_nanos
    for index, tier in enumerate(price.tiers):
        last = index == len(price.tiers) - 1
        if tier.unit_price_micros < 0:
            raise InvalidArgument(f"{where}: unit prices must not be negative")
        if tier.price_per_quantity_nanos <= 0:
            raise InvalidArgument(f"{where}: price_per_quantity must be positive")
        if last != (tier.up_to_nanos is None):
            raise InvalidArgument(f"{where}: every tier but the last needs up_to; the last must be unbounded")
        if tier.up_to_nanos is not None:
            if tier.up_to_nanos <= bound:
                raise InvalidArgument(f"{where}: tier bounds must increase and exceed the free quantity")
            bound = tier.up_to_nanos


def _q(units: int) -> int:
    return units * NANOS


def _on_demand_prices(scale_num: int = 1, scale_den: int = 1) -> tuple[MeterPrice, ...]:
    """The default prices, optionally scaled by an exact fraction (committed plans)."""

    def p(micros: int) -> int:
        value, remainder = divmod(micros * scale_num, scale_den)
        assert remainder == 0, "scaled default prices stay whole micros"
        return value

    def flat(micros: int, per: int) -> tuple[PriceTier, ...]:
        return (PriceTier(None, p(micros), _q(per)),)

    gpu = [
        ("nvidia-h100-80gb", 4_000_000),
        ("nvidia-a100-80gb", 2_500_000),
        ("nvidia-l4", 800_000),
    ]
    prices = [MeterPrice("gpu_seconds", (("gpu_type", name),), 0, flat(hourly, 3600)) for name, hourly in gpu]
    prices += [
        # Any other GPU: 2.00 per GPU-hour.
        MeterPrice("gpu_seconds", (), 0, flat(2_000_000, 3600)),
        # 0.04 per core-hour, the first 10 core-hours of a month free.
        MeterPrice("cpu_core_seconds", (), _q(36_000), flat(40_000, 3600)),
        # 0.005 per GiB-hour.
        MeterPrice("memory_gib_seconds", (), 0, flat(5_000, 3600)),
        # About 0.023 per GiB-month, 5 GiB-months free, cheaper beyond 50,000 GiB-months.
        MeterPrice(
            "storage_gib_hours",
            (),
            _q(3_650),
            (PriceTier(_q(36_500_000), p(31_500), _q(1000)), PriceTier(None, p(30_000), _q(1000))),
        ),
        # The first million requests of a month free, 0.20 per million to 100 million, 0.15 per million beyond.
        MeterPrice(
            "inference_requests",
            (),
            _q(1_000_000),
            (PriceTier(_q(100_000_000), p(200_000), _q(1_000_000)), PriceTier(None, p(150_000), _q(1_000_000))),
        ),
        # 1.80 per hour of model compute, the first hour free.
        MeterPrice("inference_compute_ms", (), _q(3_600_000), flat(500, 1000)),
    ]
    return tuple(prices)


def default_price_book(currency: str, effective_ns: int = 0, create_ns: int = 0) -> PriceBook:
    """Version 1 of the platform default book: on-demand prices, and a committed plan 25% cheaper for a
    10,000 monthly commitment."""
    return PriceBook(
        tenant="",
        version=1,
        currency=currency,
        plans=(
            Plan(DEFAULT_PLAN, PlanKind.ON_DEMAND, _on_demand_prices(), description="pay for what is used"),
            Plan(
                "committed-10k",
                PlanKind.COMMITTED,
                _on_demand_prices(3, 4),
                monthly_commitment_micros=10_000 * 1_000_000,
                description="25% off on-demand prices for a monthly commitment of 10,000",
            ),
        ),
        effective_ns=effective_ns,
        create_ns=create_ns,
    )
