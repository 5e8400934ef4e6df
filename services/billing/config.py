"""Settings of the billing service."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.mesh.config import MeshSettings, load_settings, setting

__all__ = ["BillingSettings"]


@dataclass(frozen=True)
class BillingSettings(MeshSettings):
    """MeshSettings plus the platform currency, the late-usage rules and the budget read model's refresh."""

    billing_currency: str = setting(
        "USD", "ISO 4217 currency of every price, budget, credit and invoice (the seeded price book's currency)."
    )
    billing_max_future_seconds: int = setting(300, "How far in the future of the billing clock a usage event may be.")
    billing_invoice_grace_seconds: int = setting(
        3600, "Seconds after a month ends before its invoice may be finalized (late usage still counts until then)."
    )
    billing_budget_refresh_seconds: float = setting(
        2.0,
        "How often budget views of tenants with new usage are recomputed (and their alerts raised); also how soon a "
        "replica's budget answers reflect usage, budgets, credit and prices changed through another replica.",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BillingSettings:
        return load_settings(cls, env)

    def validate(self) -> None:
        super().validate()
        if not re.fullmatch(r"[A-Z]{3}", self.billing_currency):
            raise ValueError(f"AIDC_BILLING_CURRENCY must be an ISO 4217 code, not {self.billing_currency!r}")
        if self.billing_max_future_seconds < 0 or self.billing_invoice_grace_seconds < 0:
            raise ValueError("AIDC_BILLING_MAX_FUTURE_SECONDS and AIDC_BILLING_INVOICE_GRACE_SECONDS must be >= 0")
        if self.billing_budget_refresh_seconds <= 0:
            raise ValueError("AIDC_BILLING_BUDGET_REFRESH_SECONDS must be positive")

    @property
    def billing_dir(self) -> Path:
        return self.data_dir / "billing"
