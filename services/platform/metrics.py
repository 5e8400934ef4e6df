"""What the supervisor itself exports: whether each component is ready, and its restarts by reason (it exited, or
it hung). Its own registry: the supervisor serves no RPCs, and tests run several supervisors in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["SupervisorMetrics"]


class SupervisorMetrics:
    """What the supervisor exports (its own registry: the supervisor serves no RPCs)."""

    def __init__(self, components: list[str]) -> None:
        self.registry = CollectorRegistry()
        self.up = Gauge(
            "aidc_component_up",
            "1 while the component answers its health check as ready, else 0 (starting, restarting, hung, down).",
            ["component"],
            registry=self.registry,
        )
        self.restarts = Counter(
            "aidc_component_restarts",
            "Restarts of a component by the supervisor, by reason: it exited, or it hung (stopped answering health).",
            ["component", "reason"],
            registry=self.registry,
        )
        for name in components:  # every series exists from the start, so the first restart is an increase
            self.up.labels(name).set(0)
            for reason in ("exit", "hung"):
                self.restarts.labels(name, reason)
