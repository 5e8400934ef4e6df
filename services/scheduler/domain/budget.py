"""Budget-aware admission: billing's CheckBudget answers per tenant, fetched before a cycle and cached briefly, turned
into the policy core's synchronous budget callback.

Billing is asked whether the tenant may spend what its jobs holding resources may still cost (their estimates: they
are billed as they run, so this errs on the safe side) plus its next queued job's estimate. The callback allows a job
when billing allowed at least that much (jobs admitted earlier in the same cycle count too), refuses it with
billing's reason when billing refused as little, and otherwise makes the job wait for a fresh answer (the next
cycle asks again). A tenant whose spend nothing limits is never refused. When billing does not answer, admission goes
on (as the serving gateway does): a billing outage must not stop the platform; the next answer applies again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from services.mesh.errors import AidcError

__all__ = ["BudgetAnswer", "BudgetGate", "BudgetSource"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BudgetAnswer:
    allowed: bool
    #: Micros the tenant may still spend this month; None: unlimited.
    remaining_micros: int | None
    reason: str


class BudgetSource(Protocol):
    async def check_budget(self, tenant: str, estimated_micros: int) -> BudgetAnswer: ...


@dataclass
class _Decision:
    answer: BudgetAnswer | None  # None: billing did not answer (admission goes on)
    #: What billing was asked about: reserved + the next job's estimate.
    asked_micros: int
    fresh_until: float


def _money(micros: int, currency: str) -> str:
    return f"{micros / 1_000_000:.2f} {currency}"


class BudgetGate:
    def __init__(
        self,
        source: BudgetSource,
        cache_seconds: float,
        reserved: Callable[[str], int],
        currency: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._ttl = cache_seconds
        self._reserved = reserved
        self._currency = currency
        self._clock = clock
        self._decisions: dict[str, _Decision] = {}
        self._spent: dict[str, int] = {}

    async def prefetch(self, tenants: Iterable[str], estimate: Callable[[str], int]) -> None:
        """Asks billing about the tenants whose answer is stale, with their next job's estimated cost."""
        now = self._clock()
        stale = [t for t in tenants if (d := self._decisions.get(t)) is None or d.fresh_until <= now]
        if stale:
            asked = [self._reserved(t) + estimate(t) for t in stale]
            answers = await asyncio.gather(*(self._ask(t, micros) for t, micros in zip(stale, asked, strict=True)))
            for tenant, micros, answer in zip(stale, asked, answers, strict=True):
                self._decisions[tenant] = _Decision(answer, micros, self._clock() + self._ttl)
        self._spent.clear()

    async def _ask(self, tenant: str, estimate: int) -> BudgetAnswer | None:
        try:
            return await self._source.check_budget(tenant, estimate)
        except AidcError as exc:
            previous = self._decisions.get(tenant)
            if previous is None or previous.answer is not None:  # once per outage, not every cycle
                log.warning("billing did not answer the budget check of %s (%s); admitting without it", tenant, exc)
            return None

    def invalidate(self, tenant: str | None = None) -> None:
        if tenant is None:
            self._decisions.clear()
        else:
            self._decisions.pop(tenant, None)

    def check(self, tenant: str, cost_micros: int) -> tuple[bool, str]:
        """The core's budget callback: whether ``tenant`` may start something estimated at ``cost_micros``."""
        decision = self._decisions.get(tenant)
        answer = decision.answer if decision is not None else None
        if answer is None or answer.remaining_micros is None:  # billing did not answer, or nothing limits spend
            allowed, reason = answer is None or answer.allowed, answer.reason if answer is not None else ""
        else:
            assert decision is not None
            need = self._reserved(tenant) + self._spent.get(tenant, 0) + cost_micros
            if answer.allowed and need <= decision.asked_micros:
                allowed, reason = True, ""
            elif not answer.allowed and need >= decision.asked_micros:
                allowed, reason = False, answer.reason
            else:
                # Billing answered about another amount: ask again before the next cycle.
                self._decisions.pop(tenant, None)
                allowed = False
                reason = answer.reason or (
                    f"checking that the estimated cost {_money(cost_micros, self._currency)} fits the "
                    f"{_money(answer.remaining_micros, self._currency)} the tenant may still spend this month"
                )
        if allowed:
            self._spent[tenant] = self._spent.get(tenant, 0) + cost_micros
            return True, ""
        return False, reason  # the policy core says "waiting for budget: ..."
