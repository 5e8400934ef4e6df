"""The gateway's per-tenant admission limits: a token-bucket rate limit and a cached budget decision.

Both answer from memory on the request path. The budget decision comes from billing's CheckBudget; only a tenant's
first request waits for it. After that an expired decision keeps applying while one background call refreshes it,
so billing's latency (or an outage) never lands on an inference request.

Billing unreachable (or answering with an error) fails open: inference keeps running, a warning is logged, and usage
is still metered through the durable outbox, so the tenant is charged once billing is back. Refusing inference
because the billing service is down would turn a bookkeeping outage into a product outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.gen.aidc.billing.v1 import billing_service_pb2 as billing_pb
from services.mesh.errors import AidcError, QuotaExceeded
from services.mesh.ratelimit import TokenBuckets

__all__ = ["TenantRateLimiter", "BudgetGuard", "BudgetDecision", "BudgetSource"]

log = logging.getLogger(__name__)

_FAILED_OPEN = "billing unreachable; allowed without a budget check"


class TenantRateLimiter:
    """A token bucket per tenant: ``rate_per_second`` requests on average, ``burst`` at once; rate 0 is no limit."""

    def __init__(self, rate_per_second: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets = TokenBuckets(rate_per_second, burst, clock)

    def admit(self, tenant: str) -> None:
        """Takes one token from the tenant's bucket; QuotaExceeded (RESOURCE_EXHAUSTED) when it is empty, with the
        seconds until the next token as its retry hint."""
        wait = self._buckets.take(tenant)
        if wait:
            raise QuotaExceeded(
                f"tenant {tenant!r} exceeded its inference rate limit of {self._buckets.rate:g} requests/s "
                f"(burst {self._buckets.burst:g}); retry in {wait:.2f}s",
                retry_after_seconds=wait,
            )


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    """What billing said about a tenant, and until when it is trusted without asking again."""

    allowed: bool
    reason: str
    fresh_until: float


class BudgetSource(Protocol):
    """Billing's side of the guard (BillingClient)."""

    async def check_budget(self, tenant: str) -> billing_pb.CheckBudgetResponse: ...

    async def close(self) -> None: ...


class BudgetGuard:
    """Billing's CheckBudget decision per tenant, cached for ``cache_seconds`` and refreshed in the background."""

    def __init__(
        self, billing: BudgetSource, cache_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._billing = billing
        self._ttl = cache_seconds
        self._clock = clock
        self._decisions: dict[str, BudgetDecision] = {}
        self._refreshing: dict[str, asyncio.Task[BudgetDecision]] = {}

    async def admit(self, tenant: str) -> None:
        """Returns when the tenant may spend; QuotaExceeded (RESOURCE_EXHAUSTED) with billing's reason when not.

        RESOURCE_EXHAUSTED rather than FAILED_PRECONDITION: it is the status of every spending limit in aidc
        (QuotaExceeded), and clients already treat it as "not now, maybe later", which is what a budget is.
        """
        decision = self._decisions.get(tenant)
        if decision is None:
            # shield: a caller that gives up must not cancel the answer other first requests wait for.
            decision = await asyncio.shield(self._refresh(tenant))
        elif decision.fresh_until <= self._clock():
            self._refresh(tenant)  # the stale decision applies until billing answers
        if not decision.allowed:
            raise QuotaExceeded(f"tenant {tenant!r} may not spend more: {decision.reason}")

    def _refresh(self, tenant: str) -> asyncio.Task[BudgetDecision]:
        """The one call in flight for a tenant (concurrent first requests share it)."""
        task = self._refreshing.get(tenant)
        if task is None:
            task = self._refreshing[tenant] = asyncio.create_task(self._ask(tenant), name=f"budget-{tenant}")
        return task

    async def _ask(self, tenant: str) -> BudgetDecision:
        try:
            answer = await self._billing.check_budget(tenant)
            decision = BudgetDecision(answer.allowed, answer.reason, self._clock() + self._ttl)
        except AidcError as exc:
            previous = self._decisions.get(tenant)
            if previous is None or previous.reason != _FAILED_OPEN:
                log.warning("billing did not answer the budget check of %s (%s); allowing inference", tenant, exc)
            decision = BudgetDecision(True, _FAILED_OPEN, self._clock() + self._ttl)
        finally:
            self._refreshing.pop(tenant, None)
        self._decisions[tenant] = decision
        return decision

    async def close(self) -> None:
        """Stops refreshes in flight and closes the billing channel."""
        tasks = list(self._refreshing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._billing.close()
