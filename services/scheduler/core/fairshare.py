"""Dominant-resource fair shares by progressive filling, each tenant capped at its demand (Armada #3714): what
each tenant is entitled to, so idle tenants hold no share and their part goes to those who want it."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["drf_fair_shares", "dominant_share"]

_ITERATIONS = 100


def dominant_share(amount: tuple[int, int, int], capacity: tuple[int, int, int]) -> float:
    """max over resources of amount / capacity (resources the pool does not have are left out)."""
    return max((a / c for a, c in zip(amount, capacity, strict=True) if c > 0), default=0.0)


def drf_fair_shares(
    capacity: tuple[int, int, int],
    demands: Mapping[str, tuple[int, int, int]],
    weights: Mapping[str, float],
) -> dict[str, float]:
    """Each tenant's DRF entitlement as a dominant share of ``capacity``.

    Progressive filling: every tenant with demand grows along its own demand vector, its dominant share at
    ``level x weight``, until the pool runs out of some resource; a tenant stops at its whole demand, and what it
    leaves goes on to the others. A tenant without demand (idle) gets 0, and so does a weight of 0."""
    dominant = {t: dominant_share(d, capacity) for t, d in demands.items()}
    active = {t: s for t, s in dominant.items() if s > 0 and weights.get(t, 1.0) > 0}
    if not active:
        return {t: 0.0 for t in demands}

    def used_at(level: float) -> list[float]:
        used = [0.0, 0.0, 0.0]
        for t, dom in active.items():
            fraction = min(1.0, level * weights.get(t, 1.0) / dom)
            for r in range(3):
                used[r] += fraction * demands[t][r]
        return used

    def feasible(level: float) -> bool:
        return all(u <= c for u, c in zip(used_at(level), capacity, strict=True) if c > 0)

    low, high = 0.0, max(dom / weights.get(t, 1.0) for t, dom in active.items())
    if feasible(high):
        low = high
    else:
        for _ in range(_ITERATIONS):
            mid = (low + high) / 2
            if feasible(mid):
                low = mid
            else:
                high = mid
    return {t: (min(active[t], low * weights.get(t, 1.0)) if t in active else 0.0) for t in demands}
