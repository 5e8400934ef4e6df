"""The scheduler's store behaves the same on PostgreSQL as on its SQLite default, chosen only by the database URL:
batched inserts and updates of jobs and allocations, the active queue, listings, idempotency keys, pools, nodes
and quotas, and the migrations applied once (PostgreSQL: tests/postgres.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from services.mesh.db import open_database
from services.scheduler.core import NodeState, Prices, Resources
from services.scheduler.domain.model import (
    Allocation,
    JobRecord,
    JobState,
    NodeRecord,
    PoolRecord,
    QuotaRecord,
    StopKind,
)
from services.scheduler.executors import WorkerRef
from services.scheduler.store import MIGRATIONS, Changes, SchedulerStore
from tests.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SchedulerStore]:
    url = (
        f"sqlite:///{tmp_path / 'scheduler.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    db = open_database(url)
    db.migrate(MIGRATIONS, "scheduler")
    assert db.migrate(MIGRATIONS, "scheduler") == len(MIGRATIONS)  # a restart applies nothing again
    yield SchedulerStore(db)
    db.dispose()


def _job(n: int, tenant: str = "acme", key: str = "") -> JobRecord:
    return JobRecord(
        job_id=f"j-{n}",
        tenant=tenant,
        name=f"job {n}",
        pool="default",
        per_worker=Resources(1500, 2**30, 1, "nvidia-l4"),
        workers=2,
        priority=10,
        preemptible=True,
        argv=("python", "-c", "print('ü')"),
        env={"A": "1"},
        secret_names=("TOKEN",),
        sealed_secrets=b"\x00\xffsealed",
        working_dir="",
        max_run_seconds=3600.0,
        max_retries=1,
        grace_seconds=30.0,
        trace_carrier={"traceparent": "00-abc"},
        labels={"team": "x"},
        idempotency_key=key,
        submitted_by="user:acme/dev",
        submit_ns=10**18 + n,
        seq=n,
    )


def test_jobs_and_allocations_round_trip_in_batches(store: SchedulerStore) -> None:
    jobs = [_job(n, key=f"k{n}") for n in range(1, 6)] + [_job(6, tenant="globex", key="k1")]
    store.apply(Changes(new_jobs=jobs))
    assert [j.job_id for j in store.active_jobs()] == [f"j-{n}" for n in range(1, 7)]
    assert store.active_jobs()[0] == jobs[0]
    assert store.max_seq() == 6

    running = replace(
        jobs[0],
        state=JobState.RUNNING,
        nodes=("n1", "n2"),
        worker_refs=(WorkerRef(0, "n1", "123", "456"), WorkerRef(1, "n2", "124", "457")),
        stop=StopKind.PREEMPT,
        kill_at_ns=5,
    )
    done = replace(jobs[1], state=JobState.SUCCEEDED, end_ns=99)
    allocation = Allocation("j-1", 1, "acme", "default", ("n1", "n2"), jobs[0].per_worker, 1000)
    store.apply(Changes(jobs={"j-1": running, "j-2": done}, new_allocations={("j-1", 1): allocation}))
    assert store.job("j-1") == running and store.job("j-2") == done
    assert "j-2" not in {j.job_id for j in store.active_jobs()}
    assert store.open_allocations() == [allocation]

    released = replace(allocation, released_ns=5000, metered_until_ns=3000)
    store.apply(Changes(allocations={("j-1", 1): released}))
    assert store.open_allocations() == [released]  # released but not metered to its end: still open
    closed = replace(released, metered_until_ns=5000)
    store.apply(Changes(allocations={("j-1", 1): closed}))
    assert store.open_allocations() == [] and store.allocations_of("j-1") == [closed]

    assert store.job_by_key("acme", "k1") == running and store.job_by_key("globex", "k1") == jobs[5]
    assert store.job_by_key("acme", "nope") is None
    assert [j.job_id for j in store.jobs("acme", limit=2)] == ["j-5", "j-4"]
    assert [j.job_id for j in store.jobs("", [JobState.SUCCEEDED])] == ["j-2"]
    assert len(store.jobs("", offset=4)) == 2


def test_pools_nodes_and_quotas_are_saved_and_replaced(store: SchedulerStore) -> None:
    prices = Prices(40_000, 5_000, {"nvidia-l4": 800_000, "*": 2_000_000})
    pool = PoolRecord("default", "local", prices, 86_400.0, True, 1, 1)
    store.save_pool(pool)
    store.save_pool(replace(pool, max_run_seconds=60.0))
    assert store.pools() == [replace(pool, max_run_seconds=60.0)]
    node = NodeRecord("n1", "default", Resources(4000, 8 * 2**30, 2, "nvidia-l4"), {"z": "a"}, None, NodeState.READY)
    store.save_node(node)
    store.save_node(replace(node, state=NodeState.DRAINING, prices=prices))
    assert store.nodes() == [replace(node, state=NodeState.DRAINING, prices=prices)]
    store.remove_node("n1")
    assert store.nodes() == []
    quota = QuotaRecord("acme", "default", Resources(2000, 2**30), Resources(1000, 0), None, "lab", 2.0, 3, 4, 7)
    store.save_quota(quota)
    store.save_quota(replace(quota, cohort="other"))
    assert store.quotas() == [replace(quota, cohort="other")]
