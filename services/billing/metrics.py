"""The billing service's own figures: usage ingested (by status, and each tenant's quantity per meter), budget
alerts raised, and each tenant's month-to-date spend and whether its budget or prepaid credit is used up.

Tenant labels are bounded: tenants are created by platform admins only, and a tenant appears here once it has
usage or a budget view."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge

from services.mesh.metrics import child

__all__ = ["BillingMetrics"]

EVENTS = Counter(
    "aidc_billing_usage_events",
    "Usage events received by RecordUsage, by outcome (accepted, duplicate: already recorded, rejected).",
    ["status"],
)
USAGE = Counter(
    "aidc_billing_usage",
    "Quantity of usage accepted, per tenant and meter (in the meter's unit: requests, ms, seconds, GiB-hours).",
    ["tenant", "meter"],
)
ALERTS = Counter("aidc_billing_budget_alerts", "Budget alerts raised, by kind.", ["kind"])
EXHAUSTED = Gauge(
    "aidc_billing_budget_exhausted",
    "1 while a tenant's enforced monthly budget is reached or its prepaid credit is used up (work is refused).",
    ["tenant"],
)
SPEND = Gauge(
    "aidc_billing_month_to_date_micros",
    "A tenant's spend this month, in millionths of the platform currency, as of its last budget view.",
    ["tenant"],
)


class BillingMetrics:
    """Pre-bound children (no-ops with metrics off), handed to the core by the server's wiring."""

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self.events = {status: child(enabled, EVENTS, status) for status in ("accepted", "duplicate", "rejected")}
        self._usage: dict[tuple[str, str], Any] = {}

    def usage(self, tenant: str, meter: str, quantity: float) -> None:
        counter = self._usage.get((tenant, meter))
        if counter is None:
            counter = self._usage[tenant, meter] = child(self._enabled, USAGE, tenant, meter)
        counter.inc(quantity)

    def alert(self, kind: str) -> None:
        child(self._enabled, ALERTS, kind).inc()

    def budget(self, tenant: str, exhausted: bool, month_to_date_micros: int) -> None:
        if self._enabled:
            EXHAUSTED.labels(tenant).set(1 if exhausted else 0)
            SPEND.labels(tenant).set(month_to_date_micros)
