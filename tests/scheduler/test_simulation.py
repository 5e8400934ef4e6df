"""The 10,000-job simulation over 50 nodes and 3 tenants, driving the real policy core (see simulation.py):
no quota or capacity violated at any step, every job ends exactly once; prints makespan, utilization and shares."""

from __future__ import annotations

from tests.scheduler.simulation import TENANTS, simulate


def test_simulation_of_10000_jobs_keeps_every_invariant() -> None:
    report = simulate(n_jobs=10_000, seed=7)
    # Every job ended exactly once (simulate() also asserts nothing is left queued or running).
    assert len(report.finished) == report.jobs == 10_000
    assert set(report.finished.values()) == {1}
    # The reclaim phase: c arrives after a and b have borrowed its quota and takes it back by preemption.
    assert report.preemptions["reclaim"] > 0
    assert report.reclaim_usage["cpu"] >= 0.9, report.reclaim_usage
    # Work is never lost: preempted jobs resume and finish; a busy cluster stays busy.
    assert report.utilization["cpu"] > 0.6, report.utilization
    print(
        f"\nsimulation: {report.jobs} jobs, 50 nodes, 3 tenants, {report.cycles} cycles;"
        f" makespan {report.makespan_seconds / 3600:.1f} h; utilization "
        + ", ".join(f"{k} {v:.0%}" for k, v in report.utilization.items())
        + f"; preemptions {dict(report.preemptions)}, at most {report.attempts_max} attempts for a job;"
        + f" slowest cycle {report.max_cycle_seconds * 1000:.1f} ms"
    )
    print(
        "dominant share while all three had work queued (time average) vs DRF fair share: "
        + ", ".join(f"{t} {report.dominant_share[t]:.3f} vs {report.fair_share[t]:.3f}" for t in TENANTS)
    )
    print(
        "tenant c's usage / nominal 2 minutes after its burst: "
        + str({k: round(v, 2) for k, v in report.reclaim_usage.items()})
    )
