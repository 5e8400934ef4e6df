"""What `aidc status` shows: each component probed live, its restarts, and what its /metrics say (RPCs served and
failed, median latency, RPCs in flight, a line of its own figures; all since the component's last start)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path

from services.mesh.metrics import Scrape, scrape
from services.platform.components import Platform, build_components
from services.platform.probes import Health, probe
from services.platform.process import is_running
from services.platform.state import ComponentState, read_state

__all__ = [
    "Figures",
    "read_figures",
    "summarize",
    "SERVER_ERRORS",
    "ComponentStatus",
    "PlatformStatus",
    "platform_status",
]

#: Status codes that are the server's fault (what the availability objective counts; the alert rules use the same).
SERVER_ERRORS = ("UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED")


@dataclass(frozen=True)
class Figures:
    """One component's figures; ``error`` says why there are none."""

    rpcs: float = 0
    server_errors: float = 0
    p50_seconds: float | None = None
    in_flight: float = 0
    detail: str = ""
    error: str = ""


def read_figures(url: str, tls_dir: Path | None, component: str, timeout: float = 3.0) -> Figures:
    """Scrapes ``url`` (with the operator's client certificate) and summarizes it."""
    try:
        scraped = scrape(url, tls_dir, "cli", timeout)
    except Exception as exc:  # noqa: BLE001 - status shows what it could not read, and goes on
        return Figures(error=f"metrics unreadable: {getattr(exc, 'reason', exc)}")
    return summarize(scraped, component)


def quantile(scraped: Scrape, name: str, q: float, **labels: str) -> float | None:
    """The q-quantile of a histogram's buckets summed over series (linear within a bucket, like PromQL's)."""
    buckets: dict[float, float] = {}
    for have, value in scraped.series(f"{name}_bucket"):
        if all(have.get(k) == v for k, v in labels.items()):
            bound = float(have["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value
    if not buckets:
        return None
    edges = sorted(buckets)
    total = buckets[edges[-1]]
    if total == 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for edge in edges:
        count = buckets[edge]
        if count >= rank:
            if math.isinf(edge):
                return lower
            return lower + (edge - lower) * ((rank - below) / max(count - below, 1e-12))
        lower, below = edge, count
    return lower


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def _domain(s: Scrape, component: str) -> list[str]:
    v = s.value
    parts: list[str] = []
    if component == "auth":
        allowed, denied = (
            v("aidc_auth_decisions_total", result="allowed"),
            v("aidc_auth_decisions_total", result="denied"),
        )
        hits, misses = (
            v("aidc_auth_decision_memo_total", outcome="hit"),
            v("aidc_auth_decision_memo_total", outcome="miss"),
        )
        parts.append(f"decisions {allowed:.0f} allowed, {denied:.0f} denied; memo hits {_share(hits, hits + misses)}")
    elif component == "storage":
        tenants = len(s.series("aidc_storage_stored_bytes"))
        parts.append(
            f"{_size(v('aidc_storage_stored_bytes'))} in {v('aidc_storage_objects'):.0f} objects of {tenants} tenants; "
            f"moved {_size(v('aidc_storage_transfer_bytes_total', direction='upload'))} in, "
            f"{_size(v('aidc_storage_transfer_bytes_total', direction='download'))} out"
        )
    elif component == "training":
        jobs = ", ".join(
            f"{state} {v('aidc_training_jobs', state=state):.0f}" for state in ("queued", "running", "exporting")
        )
        ended = ", ".join(
            f"{state} {v('aidc_training_jobs_finished_total', state=state):.0f}" for state in ("succeeded", "failed")
        )
        parts.append(f"jobs {jobs}; {ended}; {v('aidc_training_steps_total'):.0f} steps")
    elif component == "scheduler":
        parts.append(
            f"queued {v('aidc_scheduler_queue_depth'):.0f}, admitted {v('aidc_scheduler_admitted_jobs'):.0f}; "
            f"{v('aidc_scheduler_admissions_total'):.0f} admissions, {v('aidc_scheduler_preemptions_total'):.0f} "
            "preemptions"
        )
    elif component == "billing":
        exhausted = sum(1 for _, value in s.series("aidc_billing_budget_exhausted") if value)
        parts.append(
            f"usage events {v('aidc_billing_usage_events_total', status='accepted'):.0f} accepted, "
            f"{v('aidc_billing_usage_events_total', status='duplicate'):.0f} duplicate, "
            f"{v('aidc_billing_usage_events_total', status='rejected'):.0f} rejected; budgets used up: {exhausted}"
        )
    elif component == "serving":
        triton = "up" if v("aidc_serving_triton_up") else "DOWN"
        parts.append(
            f"inferences {v('aidc_gateway_inferences_total'):.0f}, refused {v('aidc_gateway_refusals_total'):.0f}; "
            f"Triton {triton}"
        )
    decisions = v("aidc_authz_decisions_total")
    if decisions and component != "auth":
        parts.append(f"authz cache hits {_share(v('aidc_authz_decisions_total', source='cache'), decisions)}")
    pending, dead = v("aidc_usage_outbox_pending"), v("aidc_usage_outbox_dead_letters")
    if pending or dead:
        parts.append(
            f"usage outbox {pending:.0f} waiting (oldest {v('aidc_usage_outbox_oldest_seconds'):.0f}s), {dead:.0f} dead"
        )
    return parts


def summarize(scraped: Scrape, component: str) -> Figures:
    """The figures of one scrape of ``component``."""
    rpcs = scraped.value("grpc_server_handled_total")
    errors = sum(scraped.value("grpc_server_handled_total", grpc_code=code) for code in SERVER_ERRORS)
    return Figures(
        rpcs=rpcs,
        server_errors=errors,
        p50_seconds=quantile(scraped, "grpc_server_handling_seconds", 0.5, grpc_type="unary"),
        in_flight=scraped.value("grpc_server_in_flight"),
        detail="; ".join(_domain(scraped, component)),
    )


@dataclass(frozen=True)
class ComponentStatus:
    """One component, probed live."""

    name: str
    health: Health
    detail: str
    address: str
    pid: int | None
    restarts: int
    log_file: str
    #: Of ``restarts``, those because it hung; and why it last restarted.
    hung_restarts: int = 0
    last_restart: str = ""
    #: From its /metrics (None when it serves none).
    figures: Figures | None = None


@dataclass(frozen=True)
class PlatformStatus:
    """The live view `aidc status` prints."""

    supervisor_pid: int | None
    phase: str
    error: str
    components: list[ComponentStatus]

    @property
    def all_serving(self) -> bool:
        return bool(self.components) and all(c.health is Health.SERVING for c in self.components)


async def platform_status(platform: Platform) -> PlatformStatus:
    """Probes every component of the running platform (or, with none running, of the configured one)."""
    state = read_state(platform.run_dir)
    supervisor_pid: int | None = None
    phase, error = "not running", ""
    components: list[ComponentState] = []
    if state is not None:
        if is_running(state.supervisor):
            supervisor_pid, phase = state.supervisor_pid, state.status
        elif state.status == "failed":
            phase, error = "failed", state.error
        components = state.components
    else:
        components = [ComponentState.from_spec(spec) for spec in build_components(platform)]
    tls_dir = platform.mesh.tls_dir()

    async def figures(c: ComponentState) -> Figures | None:
        if not c.metrics_url or supervisor_pid is None:
            return None
        return await asyncio.to_thread(read_figures, c.metrics_url, tls_dir, c.name)

    results = await asyncio.gather(*(probe(c.probe, platform.mesh, 2.0) for c in components))
    read = await asyncio.gather(*(figures(c) for c in components))
    statuses = [
        ComponentStatus(
            c.name,
            result.health,
            result.detail,
            c.address,
            c.pid if c.process is not None and is_running(c.process) else None,
            c.restarts,
            c.log_file,
            hung_restarts=c.hung_restarts,
            last_restart=c.last_restart,
            figures=figures_read,
        )
        for c, result, figures_read in zip(components, results, read, strict=True)
    ]
    return PlatformStatus(supervisor_pid=supervisor_pid, phase=phase, error=error, components=statuses)
