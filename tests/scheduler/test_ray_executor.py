"""The Ray executor on a real Ray cluster (a head and two workers of 1 CPU, and a node offering no CPU; separate
raylet processes on 127.0.0.1): the pool's nodes are Ray's that offer compute; jobs are placed by resources on the
node that fits and run there; a gang is all or nothing (a 3-worker job on 2 READY nodes of 1 CPU waits queued with
its reason and never starts on Ray); cancel stops every worker through Ray; a higher-priority job preempts a
running gang, every worker of which stops (SIGTERM, checkpoint) and resumes from its checkpoint once the preemptor
is done; a node killed mid-job requeues the job, which resumes from its checkpoint on the remaining nodes and
succeeds once, each attempt metered for the time it held its allocation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.auth.config import AuthSettings
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as pb
from services.scheduler.config import SchedulerSettings
from tests.conftest import RunningAuth
from tests.ray_support import GIB, LocalRayCluster, NodeSpec, ray_cluster
from tests.scheduler.service_support import (
    RunningScheduler,
    job_dir,
    runner_command,
    runner_events,
    scheduler_env,
    start_scheduler,
    user_tokens,
    wait_for,
    wait_terminal,
)

pytestmark = pytest.mark.timeout(600)

POOL = "ray"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    # head: 1 CPU, 2 GiB; two workers of 1 CPU, one with 6 GiB (the only node a 4 GiB worker fits on); and a node
    # offering no CPU, as the scheduler's own pod joins a KubeRay cluster only to run drivers: not a pool node.
    specs = [NodeSpec(1, 2 * GIB), NodeSpec(1, 6 * GIB), NodeSpec(1, 2 * GIB), NodeSpec(0, GIB)]
    with ray_cluster(specs) as running:
        yield running


@pytest.fixture
async def scheduler(
    cluster: LocalRayCluster, auth: RunningAuth, settings: AuthSettings, tmp_path: Path
) -> AsyncIterator[RunningScheduler]:
    tokens = await user_tokens(auth)
    env = scheduler_env(
        tmp_path / "scheduler",
        settings.auth_addr,
        AIDC_CERTS_DIR=settings.certs_dir,
        AIDC_SCHEDULER_RAY_ADDRESS=cluster.address,
        AIDC_SCHEDULER_RAY_SYNC_SECONDS="0.5",
        # One replica, no failover here: a lease that outlasts the node-loss test's cluster.add, which holds this
        # event loop for seconds (Ray's node start wants the main thread), longer than 6 s on a loaded machine (a
        # fresh-clone run beside the serving benchmark lost the lease there, and the scheduler stopped itself).
        AIDC_LEADER_LEASE_SECONDS="60",
    )
    running = await start_scheduler(SchedulerSettings.from_env(env), tokens)
    try:
        yield running
    finally:
        await running.stop()


def _ray_pool(pools: list[pb.Pool]) -> pb.Pool:
    return next(p for p in pools if p.name == POOL)


async def _submit(
    running: RunningScheduler,
    command: list[str],
    *,
    workers: int = 1,
    memory: int = GIB,
    priority: int = 0,
    preemptible: bool = False,
) -> pb.Job:
    response = await running.submitter().submit_job(
        command,
        pool=POOL,
        resources=pb.Resources(cpu_millicores=1000, memory_bytes=memory),
        workers=workers,
        grace_seconds=10,
        priority=priority,
        preemptible=preemptible,
    )
    return response.job


def _ray_available_cpus() -> float:
    import ray

    return float(ray.available_resources().get("CPU", 0.0))


def _placement_groups() -> list[dict[str, object]]:
    from ray.util.placement_group import placement_group_table

    return [g for g in placement_group_table().values() if g["state"] != "REMOVED"]


async def test_the_pool_is_the_clusters_and_a_job_runs_on_the_node_that_fits(
    scheduler: RunningScheduler, cluster: LocalRayCluster
) -> None:
    pools = await scheduler.client("platform/admin").list_pools()
    pool = _ray_pool(pools)
    assert pool.executor == pb.EXECUTOR_KIND_RAY
    offering = sorted(name for name, spec in cluster.specs.items() if spec.cpus)
    assert len(offering) == 3 and len(cluster.nodes) == 4
    assert sorted(n.name for n in pool.nodes) == offering
    assert pool.capacity.cpu_millicores == 3000
    assert pool.capacity.memory_bytes == 10 * GIB
    big = next(n.name for n in pool.nodes if n.capacity.memory_bytes == 6 * GIB)

    job = await _submit(scheduler, runner_command(3, 0.05), memory=4 * GIB)
    done = await wait_terminal(scheduler.submitter(), job.job_id, timeout=120)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.state_reason
    assert list(done.placement.nodes) == [big]
    (start,) = [e for e in runner_events(scheduler.settings, job.job_id) if e["event"] == "start"]
    assert start["node"] == big  # it ran on that Ray node, not merely was booked there
    assert "AIDC_RAY_PLACEMENT" not in start["platform_variables"]


async def test_cancel_stops_every_worker_through_ray(scheduler: RunningScheduler) -> None:
    client = scheduler.submitter()
    job = await _submit(scheduler, runner_command(600, 0.1), workers=2)
    await wait_for(
        client,
        job.job_id,
        lambda _: len([e for w in (0, 1) for e in runner_events(scheduler.settings, job.job_id, w)]) >= 2,
        timeout=120,
        what="running on both workers",
    )
    running = await client.get_job(job.job_id)
    assert len(set(running.placement.nodes)) == 2  # STRICT_SPREAD: one worker per node
    starts = [runner_events(scheduler.settings, job.job_id, w)[0] for w in (0, 1)]
    assert sorted(s["node"] for s in starts) == sorted(running.placement.nodes)
    await client.cancel_job(job.job_id, reason="test")
    done = await wait_terminal(client, job.job_id, timeout=120)
    assert done.state == pb.JOB_STATE_CANCELLED
    for worker in (0, 1):
        events = [e["event"] for e in runner_events(scheduler.settings, job.job_id, worker)]
        assert events[-1] == "checkpoint", events  # SIGTERM reached the worker on its node; it checkpointed
    # Every worker's resources are back in Ray, and the gang's placement group is gone.
    await asyncio.to_thread(_wait_cpus, 3.0)
    assert not _placement_groups()


def _wait_cpus(expected: float) -> None:
    from tests.ray_support import wait_until

    wait_until(lambda: _ray_available_cpus() >= expected, 60, f"{expected} CPUs free in Ray")


async def test_a_gang_the_ready_nodes_cannot_hold_waits_and_never_starts(scheduler: RunningScheduler) -> None:
    admin = scheduler.client("platform/admin")
    pool = _ray_pool(await admin.list_pools())
    draining = next(n.name for n in pool.nodes if n.capacity.memory_bytes == 6 * GIB)
    await admin.update_node(pb.Node(name=draining, state=pb.NODE_STATE_DRAINING), ["state"])
    try:
        job = await _submit(scheduler, runner_command(3, 0.05), workers=3)
        queued = await wait_for(
            scheduler.submitter(),
            job.job_id,
            lambda j: "cannot hold 3 workers" in j.state_reason,
            timeout=60,
            what="queued with its reason",
        )
        await asyncio.sleep(2)  # a few cycles: still waiting, and nothing of it started anywhere
        queued = await scheduler.submitter().get_job(job.job_id)
        assert queued.state == pb.JOB_STATE_QUEUED
        assert not queued.placement.nodes
        assert not job_dir(scheduler.settings, job.job_id).exists()  # no driver, no worker
        assert not _placement_groups()
        assert _ray_available_cpus() == 3.0
    finally:
        await admin.update_node(pb.Node(name=draining, state=pb.NODE_STATE_READY), ["state"])
    # Once the third node is READY again, the whole gang starts.
    done = await wait_terminal(scheduler.submitter(), job.job_id, timeout=180)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.state_reason
    assert len(set(done.placement.nodes)) == 3


async def test_a_higher_priority_job_preempts_a_gang_on_ray_whose_every_worker_checkpoints_and_resumes(
    scheduler: RunningScheduler,
) -> None:
    client = scheduler.submitter()
    # A preemptible gang on all three nodes; it checkpoints when it gets SIGTERM.
    gang = await _submit(scheduler, runner_command(40, 0.1), workers=3, preemptible=True)
    workers = (0, 1, 2)
    await wait_for(
        client,
        gang.job_id,
        lambda _: all(runner_events(scheduler.settings, gang.job_id, w) for w in workers),
        timeout=120,
        what="running on all three workers",
    )
    urgent = await _submit(scheduler, runner_command(3, 0.05), priority=100)
    preempted = await wait_for(client, gang.job_id, lambda j: j.preemptions == 1, timeout=60, what="preempted")
    assert preempted.attempt == 2, preempted
    checkpointed = []
    for worker in workers:
        events = [(e["event"], e["attempt"]) for e in runner_events(scheduler.settings, gang.job_id, worker)]
        assert events[-1] == ("checkpoint", 1), events  # SIGTERM reached every worker on its node; each checkpointed
        checkpointed.append(runner_events(scheduler.settings, gang.job_id, worker)[-1]["step"])
    assert all(step > 0 for step in checkpointed)
    assert (await wait_terminal(client, urgent.job_id, timeout=120)).state == pb.JOB_STATE_SUCCEEDED

    done = await wait_terminal(client, gang.job_id, timeout=240)
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.attempt == 2, done.state_reason
    for worker, step in zip(workers, checkpointed, strict=True):
        events = runner_events(scheduler.settings, gang.job_id, worker)
        assert [(e["event"], e["attempt"]) for e in events] == [
            ("start", 1),
            ("checkpoint", 1),
            ("start", 2),
            ("done", 2),
        ], events
        assert events[2]["step"] == step  # resumed from its own checkpoint, not from the start
    await asyncio.to_thread(_wait_cpus, 3.0)
    assert not _placement_groups()


@pytest.mark.slow
async def test_a_node_killed_mid_job_requeues_it_and_it_resumes_from_its_checkpoint(
    scheduler: RunningScheduler, cluster: LocalRayCluster
) -> None:
    """Last in this module: it kills a node of the module's cluster (after adding one, so that three remain)."""
    [before] = await scheduler.submitter().get_quota(pool=POOL)
    cluster.add(NodeSpec(1, 2 * GIB))  # in this thread: Ray sets a signal handler (a few seconds, nothing runs)
    client = scheduler.submitter()
    # The pool's default quota (the whole cluster) grows with it: a cluster's workers join one by one.
    for _ in range(100):
        [grown] = await client.get_quota(pool=POOL)
        if grown.quota.nominal.cpu_millicores == before.quota.nominal.cpu_millicores + 1000:
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"the default quota stayed {grown.quota.nominal} after a node joined")
    job = await _submit(scheduler, runner_command(60, 0.1, "--checkpoint-every", "5"), workers=2)
    directory = job_dir(scheduler.settings, job.job_id)

    def checkpointed(worker: int) -> int:
        path = directory / f"checkpoint-{worker}.json"
        return int(json.loads(path.read_text())["step"]) if path.exists() else 0

    await wait_for(
        client,
        job.job_id,
        lambda _: min(checkpointed(0), checkpointed(1)) >= 10,
        timeout=180,
        what="checkpointed on both workers",
    )
    first = await client.get_job(job.job_id)
    victim = next(n for n in first.placement.nodes if n != cluster.head)
    await asyncio.to_thread(cluster.kill, victim)

    requeued = await wait_for(client, job.job_id, lambda j: j.attempt == 2, timeout=120, what="requeued (attempt 2)")
    assert "lost with its node" in requeued.state_reason or requeued.state != pb.JOB_STATE_QUEUED
    done = await wait_terminal(client, job.job_id, timeout=240)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.state_reason
    assert done.attempt == 2 and victim not in done.placement.nodes
    for worker in (0, 1):
        events = runner_events(scheduler.settings, job.job_id, worker)
        starts = [e for e in events if e["event"] == "start"]
        assert [s["attempt"] for s in starts] == [1, 2]
        assert starts[1]["step"] >= 10  # resumed from its checkpoint, not from the start
        assert [e["event"] for e in events].count("done") == 1
    nodes = {n.name: n for n in _ray_pool(await scheduler.client("platform/admin").list_pools()).nodes}
    assert nodes[victim].state == pb.NODE_STATE_NOT_READY
    # Metered: each attempt for the time it held its allocation, the lost one up to the loss.
    allocations = _allocations(scheduler, job.job_id)
    assert [a["attempt"] for a in allocations] == [1, 2]
    assert all(a["released_ns"] > a["admitted_ns"] for a in allocations)
    assert allocations[0]["released_ns"] <= allocations[1]["admitted_ns"]


def _allocations(running: RunningScheduler, job_id: str) -> list[dict[str, int]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(running.settings.database_url_for("scheduler"))
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT attempt, record_json FROM allocations WHERE job_id = :job ORDER BY attempt"),
                {"job": job_id},
            ).all()
    finally:
        engine.dispose()
    return [{"attempt": row[0], **json.loads(row[1])} for row in rows]
