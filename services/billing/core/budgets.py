"""The budget read model: per tenant, month-to-date charges, credit and budget, kept in memory so CheckBudget
costs a dictionary lookup; recomputed in the background for tenants whose usage changed. And the rule of what a
tenant may change in its own budget."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.billing.core.model import Budget, BudgetCheck
from services.billing.core.quantities import format_micros
from services.mesh.errors import PermissionDenied

__all__ = ["BudgetView", "BudgetReadModel", "decide", "check_tenant_change", "ALL_TENANTS"]

#: A change of every tenant's view (a price book), as other replicas learn of it.
ALL_TENANTS = "*"


def check_tenant_change(current: Budget | None, limit_micros: int | None, enforce: bool, prepaid: bool | None) -> None:
    """PermissionDenied unless a tenant (not the platform) may set its budget so.

    Whether a tenant is prepaid is the platform's decision (its credit risk), and so is a monthly limit the platform
    set: the tenant may lower it or enforce it, never raise it, remove it or stop enforcing it. Within those bounds a
    tenant manages its own budget freely (a limit it set itself it may raise again, up to the platform's)."""
    if prepaid is not None and prepaid != (current is not None and current.prepaid):
        raise PermissionDenied("whether a tenant is prepaid is set by the platform, not by the tenant")
    if current is None or current.platform_limit_micros is None:
        return
    cap = f"{format_micros(current.platform_limit_micros)} {current.currency}"
    if limit_micros is None or limit_micros > current.platform_limit_micros:
        raise PermissionDenied(f"the platform set a monthly limit of {cap}: it may be lowered, not raised or removed")
    if current.platform_enforce and not enforce:
        raise PermissionDenied(f"the platform enforces the monthly limit of {cap}: enforcement cannot be switched off")


@dataclass(frozen=True)
class BudgetView:
    """What CheckBudget needs about one tenant, as of ``as_of_ns``."""

    tenant: str
    currency: str
    month_start_ns: int
    month_to_date_micros: int
    credit_micros: int
    budget: Budget | None
    plan: str
    as_of_ns: int

    @property
    def remaining_budget_micros(self) -> int | None:
        if self.budget is None or self.budget.limit_micros is None:
            return None
        return self.budget.limit_micros - self.month_to_date_micros

    @property
    def remaining_credit_micros(self) -> int | None:
        if self.budget is None or not self.budget.prepaid:
            return None
        return self.credit_micros - self.month_to_date_micros


def decide(view: BudgetView, estimated_micros: int) -> BudgetCheck:
    """Whether spending ``estimated_micros`` more is allowed: refused when an enforced monthly budget or a
    prepaid balance would be exceeded (or, for a zero estimate, is already used up)."""
    reasons = []
    limits = []
    spent = view.month_to_date_micros
    money = lambda micros: f"{format_micros(micros)} {view.currency}"  # noqa: E731
    budget = view.budget
    remaining = view.remaining_budget_micros
    if budget is not None and budget.limit_micros is not None and remaining is not None:
        limits.append(remaining)
        if budget.enforce and _exceeds(spent, estimated_micros, budget.limit_micros):
            if estimated_micros and spent < budget.limit_micros:
                reasons.append(
                    f"monthly budget of {money(budget.limit_micros)} would be exceeded "
                    f"(month to date {money(spent)}, estimate {money(estimated_micros)})"
                )
            else:
                reasons.append(f"monthly budget of {money(budget.limit_micros)} reached (month to date {money(spent)})")
    credit_left = view.remaining_credit_micros
    if credit_left is not None:
        limits.append(credit_left)
        if _exceeds(spent, estimated_micros, view.credit_micros):
            reasons.append(f"prepaid credit exhausted ({money(credit_left)} left)")
    return BudgetCheck(
        allowed=not reasons,
        remaining_micros=min(limits) if limits else None,
        currency=view.currency,
        reason="; ".join(reasons),
        as_of_ns=view.as_of_ns,
    )


def _exceeds(spent: int, estimate: int, limit: int) -> bool:
    return spent + estimate > limit or (estimate == 0 and spent >= limit)


class BudgetReadModel:
    """Views by tenant, with the set of tenants whose view is stale. Safe to use from several threads."""

    def __init__(self, compute: Callable[[str], BudgetView], current_month: Callable[[], int]) -> None:
        self._compute = compute
        self._current_month = current_month
        self._views: dict[str, BudgetView] = {}
        self._dirty: set[str] = set()
        self._lock = threading.Lock()

    def has_view(self, tenant: str) -> bool:
        """Whether ``get`` will answer from memory."""
        view = self._views.get(tenant)
        return view is not None and view.month_start_ns == self._current_month()

    def get(self, tenant: str) -> BudgetView:
        """The cached view (possibly a little stale: see as_of), computed now if there is none for this month."""
        view = self._views.get(tenant)
        if view is None or view.month_start_ns != self._current_month():
            view = self.refresh(tenant)
        return view

    def refresh(self, tenant: str) -> BudgetView:
        """Recomputes a tenant's view now."""
        with self._lock:
            self._dirty.discard(tenant)
        view = self._compute(tenant)
        with self._lock:
            self._views[tenant] = view
        return view

    def mark_dirty(self, tenants: Iterable[str]) -> None:
        """Usage (or credit) of these tenants changed: recompute them at the next refresh (which also raises
        their alerts, whether or not anyone asked about their budget)."""
        with self._lock:
            self._dirty.update(tenants)

    def mark_held_dirty(self, tenants: Iterable[str] | None = None) -> None:
        """Of the views held, marks those of ``tenants`` (None: all) stale: another replica changed them."""
        with self._lock:
            held = self._views.keys() if tenants is None else self._views.keys() & set(tenants)
            self._dirty.update(held)

    def invalidate(self, tenant: str | None = None) -> None:
        """Forgets one tenant's view (or every view): the next read recomputes it."""
        with self._lock:
            if tenant is None:
                self._views.clear()
                self._dirty.clear()
            else:
                self._views.pop(tenant, None)
                self._dirty.discard(tenant)

    def refresh_dirty(self) -> list[str]:
        """Recomputes every stale view (and views of a past month); returns the tenants refreshed."""
        month = self._current_month()
        with self._lock:
            stale = self._dirty | {t for t, v in self._views.items() if v.month_start_ns != month}
        for tenant in sorted(stale):
            self.refresh(tenant)
        return sorted(stale)
