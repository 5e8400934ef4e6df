"""A discrete-event simulation that drives the real policy core: seeded arrivals, durations and sizes, gangs, GPU
nodes of two models, priorities, preemption with a grace period and resume from checkpoint, and a reclaim phase.
It checks the invariants after every step and reports makespan, utilization and shares."""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from dataclasses import dataclass, field

from services.scheduler.core import GIB, Job, Node, Pool, Prices, Quota, Resources, Scheduler

__all__ = ["SimulationReport", "simulate", "TENANTS", "POOL"]

POOL = "sim"
TENANTS = ("a", "b", "c")
_GRACE_SECONDS = 30.0
#: The scheduling period: events are applied and a cycle runs every TICK_SECONDS of simulated time.
TICK_SECONDS = 5.0
_GPU_TYPES = ("a100", "h100")


@dataclass
class SimulationReport:
    jobs: int
    makespan_seconds: float
    utilization: dict[str, float]  # time-averaged allocated / capacity, per resource
    dominant_share: dict[str, float]  # time-averaged, while every tenant had work queued
    fair_share: dict[str, float]  # time-averaged DRF entitlement over the same samples
    contended_seconds: float
    cycles: int
    preemptions: Counter[str] = field(default_factory=Counter)  # by kind: reclaim, fair sharing, priority
    finished: Counter[str] = field(default_factory=Counter)  # finishes per job id
    attempts_max: int = 0
    reclaim_usage: dict[str, float] = field(default_factory=dict)  # tenant c's usage / nominal after the reclaim
    max_cycle_seconds: float = 0.0


@dataclass
class _Run:
    job: Job
    remaining: float
    attempt: int = 0
    started: float = -1.0  # of the current attempt; -1 while queued
    stopping: bool = False


def _nodes() -> list[Node]:
    nodes = []
    for i in range(40):
        # Two CPU node generations at two prices: placement should prefer the cheaper one.
        price = Prices(40_000 if i % 2 else 48_000, 5_000)
        nodes.append(Node(f"cpu-{i:02d}", POOL, Resources(32_000, 128 * GIB), prices=price))
    for i in range(10):
        gpu_type = _GPU_TYPES[i % 2]
        price = Prices(40_000, 5_000, {gpu_type: 2_000_000 if gpu_type == "a100" else 4_000_000})
        nodes.append(Node(f"gpu-{i:02d}", POOL, Resources(64_000, 512 * GIB, 8, gpu_type), prices=price))
    return nodes


def _quotas(capacity: Resources) -> list[Quota]:
    third = Resources(capacity.cpu_millicores // 3, capacity.memory_bytes // 3, capacity.gpus // 3)
    return [
        # a lends only half of its nominal quota; b may run at most 300 jobs; c may borrow a little only.
        Quota(
            "a",
            POOL,
            third,
            lending_limit=Resources(third.cpu_millicores // 2, third.memory_bytes // 2, 13),
            cohort="all",
        ),
        Quota("b", POOL, third, cohort="all", max_running_jobs=300),
        Quota("c", POOL, third, borrowing_limit=Resources(16_000, 64 * GIB, 8), cohort="all"),
    ]


def _jobs(rng: random.Random, n: int, reclaim_at: float) -> list[tuple[float, Job, float]]:
    """(arrival time, job, duration); a and b arrive from t=0, c all at once at ``reclaim_at``."""
    out = []
    per_tenant = {"a": int(n * 0.4), "b": int(n * 0.4)}
    per_tenant["c"] = n - per_tenant["a"] - per_tenant["b"]
    seq = 0
    for tenant, count in per_tenant.items():
        t = 0.0
        for i in range(count):
            if tenant == "c":
                arrival = reclaim_at
            else:
                t += rng.expovariate(1 / 1.5)
                arrival = t
            kind = rng.random()
            workers = 1
            if kind < 0.05:  # GPU jobs
                gpus = rng.choice((1, 1, 2, 4, 8))
                per_worker = Resources(gpus * 4000, gpus * 32 * GIB, gpus, rng.choice(("", "a100", "h100")))
                if rng.random() < 0.3:
                    workers = rng.choice((2, 4))
            else:
                cores = rng.choice((1, 2, 2, 4, 4, 8, 16))
                per_worker = Resources(cores * 1000, cores * rng.choice((2, 4, 8)) * GIB)
                if rng.random() < 0.05:
                    workers = rng.choice((2, 4, 8))
            seq += 1
            job = Job(
                f"{tenant}-{i:05d}",
                tenant,
                POOL,
                per_worker,
                workers=workers,
                priority=rng.choice((0,) * 12 + (100,) * 6 + (500,) * 2),
                preemptible=rng.random() > 0.1,
                seq=seq,
                max_run_seconds=7200,
            )
            out.append((arrival, job, rng.uniform(60, 1800)))
    return out


def simulate(n_jobs: int = 10_000, seed: int = 7, reclaim_at: float = 3000.0) -> SimulationReport:
    """Runs the simulation to the end, asserting the invariants at every step."""
    import time as wallclock

    rng = random.Random(seed)
    sched = Scheduler()
    sched.upsert_pool(Pool(POOL, Prices(50_000, 5_000), max_run_seconds=7200))
    nodes = _nodes()
    for node in nodes:
        sched.upsert_node(node)
    capacity = sched.capacity(POOL)
    quotas = {q.tenant: q for q in _quotas(capacity)}
    for quota in quotas.values():
        sched.set_quota(quota)
    node_cap = {node.name: node.capacity for node in nodes}

    runs: dict[str, _Run] = {}
    events: list[tuple[float, int, str, str, int]] = []  # (time, order, kind, job id, attempt)
    order = 0
    for arrival, job, duration in _jobs(rng, n_jobs, reclaim_at):
        runs[job.job_id] = _Run(job, duration)
        events.append((arrival, order, "arrive", job.job_id, 0))
        order += 1
    heapq.heapify(events)

    report = SimulationReport(n_jobs, 0.0, {}, {}, {}, 0.0, 0)
    # The simulation's own account of what runs where, to check the scheduler's against.
    held_by_tenant = {t: [0, 0, 0] for t in TENANTS}
    held_on_node = {name: [0, 0, 0] for name in node_cap}
    running: dict[str, tuple[str, ...]] = {}
    util_area = [0.0, 0.0, 0.0]
    share_area = dict.fromkeys(TENANTS, 0.0)
    fair_area = dict.fromkeys(TENANTS, 0.0)
    sampled_time = 0.0
    last_time = 0.0
    steps = 0
    cap = capacity.as_tuple()

    def account(job: Job, nodes_: tuple[str, ...], sign: int) -> None:
        q = job.per_worker.as_tuple()
        for r in range(3):
            held_by_tenant[job.tenant][r] += sign * q[r] * job.workers
        for name in nodes_:
            for r in range(3):
                held_on_node[name][r] += sign * q[r]

    def stop(job_id: str) -> None:
        run = runs[job_id]
        account(run.job, running.pop(job_id), -1)
        assert sched.release(job_id)
        run.started = -1.0
        run.stopping = False

    def allow(tenant: str, cost: int) -> tuple[bool, str]:
        assert cost > 0
        return True, ""

    while events:
        # Like the service, cycle on a tick: everything that happened since the last one, then one cycle.
        now = math.ceil(events[0][0] / TICK_SECONDS) * TICK_SECONDS
        # Time-weighted statistics over [last_time, now), from the state the last step left.
        dt = now - last_time
        for r in range(3):
            util_area[r] += dt * sum(h[r] for h in held_by_tenant.values()) / cap[r]
        last_time = now
        while events and events[0][0] <= now:
            at, _, kind, job_id, attempt = heapq.heappop(events)
            run = runs[job_id]
            if kind == "arrive":
                sched.validate(run.job)
                sched.enqueue(run.job)
            elif kind == "finish" and attempt == run.attempt and run.started >= 0:
                stop(job_id)
                report.finished[job_id] += 1
            elif kind == "stopped" and attempt == run.attempt and run.started >= 0:
                # The runner checkpointed on SIGTERM: the next attempt resumes from there.
                run.remaining -= at - run.started
                stop(job_id)
                sched.enqueue(run.job)
        started = wallclock.perf_counter()
        result = sched.cycle(allow)
        report.max_cycle_seconds = max(report.max_cycle_seconds, wallclock.perf_counter() - started)
        report.cycles += 1
        for admission in result.admitted:
            run = runs[admission.job_id]
            assert run.started < 0, f"{admission.job_id} admitted while running"
            assert len(admission.nodes) == run.job.workers
            run.attempt += 1
            run.started = now
            running[admission.job_id] = admission.nodes
            account(run.job, admission.nodes, 1)
            heapq.heappush(events, (now + run.remaining, order, "finish", admission.job_id, run.attempt))
            order += 1
        for preemption in result.preempted:
            run = runs[preemption.job_id]
            assert run.started >= 0 and not run.stopping, f"{preemption.job_id} preempted twice"
            assert run.job.preemptible
            run.stopping = True
            kind_ = (
                "reclaim" if "reclaims" in preemption.reason else "fair" if "fair" in preemption.reason else "priority"
            )
            report.preemptions[kind_] += 1
            heapq.heappush(events, (now + _GRACE_SECONDS, order, "stopped", preemption.job_id, run.attempt))
            order += 1
        _check(sched, quotas, held_by_tenant, held_on_node, node_cap, running)
        steps += 1
        if now >= reclaim_at and not report.reclaim_usage and now >= reclaim_at + 4 * _GRACE_SECONDS:
            usage = held_by_tenant["c"]
            nominal = quotas["c"].nominal.as_tuple()
            report.reclaim_usage = {n: usage[r] / nominal[r] for r, n in enumerate(("cpu", "memory", "gpu"))}
        if steps % 50 == 0:
            queued_tenants = {sched.job(j).tenant for j in sched.queued_jobs(POOL)}  # type: ignore[union-attr]
            if queued_tenants == set(TENANTS):
                shares = sched.dominant_shares(POOL)
                fair = sched.fair_shares(POOL)
                for t in TENANTS:
                    share_area[t] += shares.get(t, 0.0)
                    fair_area[t] += fair.get(t, 0.0)
                sampled_time += 1
    report.makespan_seconds = last_time
    report.utilization = {n: util_area[r] / last_time for r, n in enumerate(("cpu", "memory", "gpu"))}
    if sampled_time:
        report.dominant_share = {t: share_area[t] / sampled_time for t in TENANTS}
        report.fair_share = {t: fair_area[t] / sampled_time for t in TENANTS}
    report.attempts_max = max(run.attempt for run in runs.values())
    stuck = {j: sched.reason(j) for j in sched.queued_jobs()}
    assert not running and not stuck and sched.admitted_count() == 0, list(stuck.items())[:5]
    return report


def _check(
    sched: Scheduler,
    quotas: dict[str, Quota],
    held_by_tenant: dict[str, list[int]],
    held_on_node: dict[str, list[int]],
    node_cap: dict[str, Resources],
    running: dict[str, tuple[str, ...]],
) -> None:
    """No capacity or quota is exceeded, and the scheduler's accounting equals the simulation's own."""
    for name, held in held_on_node.items():
        assert tuple(held) == sched.node_allocated(name).as_tuple(), name
        assert Resources.of(held).fits_in(node_cap[name]), f"node {name} over capacity"
    over = [0, 0, 0]
    lendable = [0, 0, 0]
    for tenant, held in held_by_tenant.items():
        assert tuple(held) == sched.usage(tenant, POOL).as_tuple(), tenant
        quota = quotas[tenant]
        nominal = quota.nominal.as_tuple()
        lend = quota.lending_limit.as_tuple() if quota.lending_limit else nominal
        for r in range(3):
            if quota.borrowing_limit is not None:
                assert held[r] <= nominal[r] + quota.borrowing_limit.as_tuple()[r], f"{tenant} above its cap"
            over[r] += max(0, held[r] - (nominal[r] - lend[r]))
            lendable[r] += lend[r]
        if quota.max_running_jobs:
            assert sum(1 for j in running if j.startswith(tenant + "-")) <= quota.max_running_jobs
    assert all(over[r] <= lendable[r] for r in range(3)), f"cohort borrows {over}, lends {lendable}"
