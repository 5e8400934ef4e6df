"""The auth service's own figures (its RPC counts and latencies, logins by status code included, come from the
mesh): permission decisions by result, and how often the exact decision memo spares a Casbin evaluation."""

from __future__ import annotations

from prometheus_client import Counter

from services.mesh.metrics import child

__all__ = ["AuthMetrics"]

DECISIONS = Counter(
    "aidc_auth_decisions",
    "Permission decisions made for CheckPermission and BatchCheckPermission, by result.",
    ["result"],
)
MEMO = Counter(
    "aidc_auth_decision_memo",
    "Lookups in auth's exact decision memo, by outcome (a miss costs a Casbin evaluation).",
    ["outcome"],
)


class AuthMetrics:
    """Pre-bound children (no-ops with metrics off), handed to the core by the server's wiring."""

    def __init__(self, enabled: bool = True) -> None:
        self.allowed = child(enabled, DECISIONS, "allowed")
        self.denied = child(enabled, DECISIONS, "denied")
        self.memo_hit = child(enabled, MEMO, "hit")
        self.memo_miss = child(enabled, MEMO, "miss")
