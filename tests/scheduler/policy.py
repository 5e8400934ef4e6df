"""Builders for the policy tests: a scheduler with pools, nodes and quotas in one call, jobs with short keywords,
and the service's side of a preemption (stop the victims, requeue them) done the way the service does it."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from services.scheduler.core import (
    GIB,
    CycleResult,
    Job,
    Node,
    Pool,
    Prices,
    Quota,
    Resources,
    Scheduler,
)

__all__ = ["ALLOW", "POOL", "cpu", "make_scheduler", "job", "submit", "cycle", "stop_victims", "running", "GIB"]

POOL = "p"
_seq = itertools.count(1)


def ALLOW(tenant: str, cost_micros: int) -> tuple[bool, str]:  # noqa: N802 - a constant-like callback
    return True, ""


def cpu(cores: float, memory_gib: int = 0, gpus: int = 0, gpu_type: str = "") -> Resources:
    return Resources(int(cores * 1000), memory_gib * GIB, gpus, gpu_type)


def make_scheduler(
    nodes: Iterable[Node] | None = None,
    quotas: Iterable[Quota] = (),
    *,
    prices: Prices | None = None,
    max_run_seconds: float = 3600,
    lookahead: int | None = None,
) -> Scheduler:
    """A scheduler with pool "p" (prices default: 1 cpu-hour = 1,000,000 micros), its nodes and quotas."""
    sched = Scheduler() if lookahead is None else Scheduler(lookahead=lookahead)
    sched.upsert_pool(Pool(POOL, prices or Prices(1_000_000, 0, {}), max_run_seconds))
    for node in nodes if nodes is not None else [Node("n1", POOL, cpu(8, 32))]:
        sched.upsert_node(node)
    for quota in quotas:
        sched.set_quota(quota)
    return sched


def job(
    job_id: str,
    tenant: str,
    per_worker: Resources | None = None,
    *,
    workers: int = 1,
    priority: int = 0,
    preemptible: bool = True,
    pool: str = POOL,
    max_run_seconds: float = 0.0,
) -> Job:
    """A job; submission order (seq) is the order of the calls."""
    return Job(
        job_id,
        tenant,
        pool,
        per_worker or cpu(1),
        workers=workers,
        priority=priority,
        preemptible=preemptible,
        seq=next(_seq),
        max_run_seconds=max_run_seconds,
    )


def submit(sched: Scheduler, *jobs: Job) -> None:
    """What SubmitJob does: validate, then enqueue."""
    for j in jobs:
        sched.validate(j)
        sched.enqueue(j)


def cycle(sched: Scheduler, budget=ALLOW) -> CycleResult:  # type: ignore[no-untyped-def]
    return sched.cycle(budget)


def stop_victims(sched: Scheduler, result: CycleResult) -> list[str]:
    """The service after SIGTERM + grace: each victim's process is gone, its resources return, it is requeued."""
    stopped = []
    for preemption in result.preempted:
        victim = sched.job(preemption.job_id)
        assert victim is not None
        assert sched.release(preemption.job_id)
        sched.enqueue(victim)
        stopped.append(preemption.job_id)
    return stopped


def running(sched: Scheduler, tenant: str | None = None) -> set[str]:
    jobs = set(sched.admitted_jobs())
    if tenant is None:
        return jobs
    return {j for j in jobs if sched.job(j).tenant == tenant}  # type: ignore[union-attr]
