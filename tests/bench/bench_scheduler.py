"""Benchmark of the scheduler's policy core: one scheduling cycle with 10,000 queued jobs over 50 nodes (goal
< 100 ms), beside a naive baseline measured in the same run.

- The cluster: 40 CPU nodes (32 cores, 128 GiB) and 10 GPU nodes (64 cores, 512 GiB, 8 GPUs of two models), at
  two CPU prices; three tenants in one cohort, each with a third of the pool as nominal quota.
- The queue: 10,000 jobs (seeded): mostly 1-16 cores, 5 % GPU jobs, some gangs of 2-8 workers, three priorities.
- Ours: Scheduler.cycle() (per-tenant sorted queues and incremental usage; a scan stops after a few refusals).
- Naive baseline: the same quota and placement code, but the queue handling that kueue #14477 describes: after
  every admission, re-sort the whole queue by fair share and scan it from the start for the first job that fits.
- Two cycles: filling the empty cluster (hundreds of admissions), and the cycle after one job ends on the full
  cluster (the steady state: most of the queue cannot fit).

Run with `make bench` (or `python -m tests.bench.bench_scheduler`). Shared machines are noisy: compare ratios.
(The RPC admissions/s benchmark is tests/bench/bench_scheduler_rpc.py.)
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

from services.scheduler.core import GIB, Job, Node, Pool, Prices, Quota, Resources, Scheduler
from services.scheduler.core.placement import NodeSlot, place
from services.scheduler.core.state import JobRecord, PoolState, queue_key

POOL = "bench"
TENANTS = ("a", "b", "c")
QUEUED = 10_000


def _allow(tenant: str, cost: int) -> tuple[bool, str]:
    return True, ""


def _pool() -> Pool:
    return Pool(POOL, Prices(50_000, 5_000, {"a100": 2_000_000, "h100": 4_000_000}), max_run_seconds=7200)


def _nodes() -> list[Node]:
    nodes = [
        Node(f"cpu-{i:02d}", POOL, Resources(32_000, 128 * GIB), prices=Prices(40_000 if i % 2 else 48_000, 5_000))
        for i in range(40)
    ]
    nodes += [Node(f"gpu-{i:02d}", POOL, Resources(64_000, 512 * GIB, 8, ("a100", "h100")[i % 2])) for i in range(10)]
    return nodes


def _quotas() -> list[Quota]:
    total = Resources(40 * 32_000 + 10 * 64_000, (40 * 128 + 10 * 512) * GIB, 80)
    third = Resources(total.cpu_millicores // 3, total.memory_bytes // 3, total.gpus // 3)
    return [Quota(t, POOL, third, cohort="all") for t in TENANTS]


def _jobs(n: int, seed: int = 11) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        workers = 1
        if rng.random() < 0.05:
            gpus = rng.choice((1, 2, 4, 8))
            per_worker = Resources(gpus * 4000, gpus * 32 * GIB, gpus, rng.choice(("", "a100", "h100")))
            if rng.random() < 0.2:
                workers = 2
        else:
            cores = rng.choice((1, 2, 2, 4, 4, 8, 16))
            per_worker = Resources(cores * 1000, cores * rng.choice((2, 4, 8)) * GIB)
            if rng.random() < 0.05:
                workers = rng.choice((2, 4, 8))
        tenant = TENANTS[i % 3]
        priority = rng.choice((0,) * 12 + (100,) * 6 + (500,) * 2)
        jobs.append(Job(f"{tenant}-{i:05d}", tenant, POOL, per_worker, workers=workers, priority=priority, seq=i))
    return jobs


def _scheduler(jobs: list[Job]) -> Scheduler:
    sched = Scheduler()
    sched.upsert_pool(_pool())
    for node in _nodes():
        sched.upsert_node(node)
    for quota in _quotas():
        sched.set_quota(quota)
    for job in jobs:
        sched.enqueue(job)
    return sched


class NaiveQueue:
    """The baseline: the core's own quota accounting and placement, with the queue handling of kueue #14477 (a full
    re-sort by fair share and a re-scan from the start for every admission)."""

    def __init__(self, jobs: list[Job]) -> None:
        self.state = PoolState(_pool())
        for node in _nodes():
            self.state.slots[node.name] = NodeSlot(node, node.prices or self.state.pool.prices)
        for quota in _quotas():
            self.state.assign(self.state.tenant(quota.tenant), quota, from_default=False)
        for job in jobs:
            tq = self.state.tenant(job.tenant)
            q = job.per_worker.as_tuple()
            total = (q[0] * job.workers, q[1] * job.workers, q[2] * job.workers)
            rec = JobRecord(job, tq, queue_key(job), q, total)
            tq.queue.append(rec.key)
            self.state.records[job.job_id] = rec
        for tq in self.state.tenants.values():
            tq.queue.sort()

    def cycle(self, budget: Callable[[str, int], tuple[bool, str]]) -> int:
        state = self.state
        admitted = 0
        while True:
            queued = [state.records[key[2]] for tq in state.tenants.values() for key in tq.queue]
            queued.sort(key=lambda rec: (rec.tq.share(rec.total), -rec.job.priority, rec.job.seq))
            for rec in queued:
                if not rec.tq.fits(rec.total):
                    continue
                placement = place(state.slots.values(), rec.job.per_worker, rec.job.workers)
                if placement is None or not budget(rec.job.tenant, state.estimate_micros(rec, placement))[0]:
                    continue
                state.unqueue(rec)
                state.admit(rec, placement)
                admitted += 1
                break
            else:
                return admitted

    def release(self, job_id: str) -> None:
        self.state.unadmit(self.state.records.pop(job_id))

    def admitted(self) -> list[str]:
        return [job_id for tq in self.state.tenants.values() for job_id in tq.admitted]


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_fill(report: list[tuple[str, float, float, str]]) -> None:
    jobs = _jobs(QUEUED)
    ours, admitted = [], 0
    for _ in range(5):
        sched = _scheduler(jobs)
        seconds, result = _timed(lambda s=sched: s.cycle(_allow))  # type: ignore[misc]
        ours.append(seconds)
        admitted = len(result.admitted)  # type: ignore[attr-defined]
    naive = NaiveQueue(jobs)
    naive_seconds, naive_admitted = _timed(lambda: naive.cycle(_allow))
    report.append(
        (
            f"fill: 1 cycle, {QUEUED:,} queued, 50 empty nodes (admits {admitted} / naive {naive_admitted})",
            statistics.median(ours) * 1000,
            naive_seconds * 1000,
            "re-sort + re-scan per admission",
        )
    )


def bench_steady(report: list[tuple[str, float, float, str]]) -> None:
    jobs = _jobs(QUEUED)
    rng = random.Random(3)
    sched = _scheduler(jobs)
    sched.cycle(_allow)
    ours = []
    for _ in range(200):
        sched.release(rng.choice(sched.admitted_jobs()))
        seconds, _ = _timed(lambda: sched.cycle(_allow))
        ours.append(seconds)
    naive = NaiveQueue(jobs)
    naive.cycle(_allow)
    base = []
    for _ in range(5):
        naive.release(rng.choice(naive.admitted()))
        seconds, _ = _timed(lambda: naive.cycle(_allow))
        base.append(seconds)
    report.append(
        (
            f"steady: 1 cycle after a job ends, full cluster, ~{sched.queued_count():,} queued",
            statistics.median(ours) * 1000,
            statistics.median(base) * 1000,
            "re-sort + re-scan per admission",
        )
    )


def main() -> None:
    report: list[tuple[str, float, float, str]] = []
    bench_fill(report)
    bench_steady(report)
    print(f"{'benchmark (goal: a cycle < 100 ms)':<78} {'aidc':>10} {'baseline':>11} {'speed-up':>9}  baseline")
    for name, ours, base, label in report:
        print(f"{name:<78} {ours:>8.1f}ms {base:>9.1f}ms {base / ours:>8.1f}x  {label}")


if __name__ == "__main__":
    main()
