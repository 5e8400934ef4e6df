"""Two scheduler replicas (OS processes on one machine, one PostgreSQL database, one jobs directory) behave as one:
only the leader admits, launches and meters; the follower forwards every RPC to it (the caller's token and the
training service's certificate identity go along, streams too). Killing the leader (SIGKILL) moves the scheduler to
the other replica within the lease's failover bound: the job running meanwhile is adopted (same machine), not
launched again, the queued one is launched by the new leader, and no allocation time is metered twice."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest

from services.cli.session import BearerToken
from services.gen.aidc.billing.v1 import billing_service_pb2 as billing_pb
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as pb
from services.mesh.channels import create_channel
from services.mesh.config import MeshSettings, load_settings
from services.scheduler.client import SchedulerClient, resources
from services.scheduler.config import SchedulerSettings
from tests.conftest import AuthProcess, start_auth_process, stop_process
from tests.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures
from tests.replicas import (
    Replica,
    admin_token,
    kill_leader,
    leader_of,
    master_keys,
    scrape_leader_gauge,
    start_replicas,
    stop_replicas,
    user_token,
)
from tests.scheduler.service_support import GIB, runner_command, runner_events, scheduler_env, set_quota, wait_for
from tests.scheduler.test_service_billing import held_seconds

pytestmark = pytest.mark.slow

LEASE_SECONDS = 3.0
CPU = 1000


@pytest.fixture
def auth(mesh_certs: Path, tmp_path: Path) -> Iterator[AuthProcess]:
    (tmp_path / "auth").mkdir()
    running = start_auth_process(tmp_path / "auth", AIDC_CERTS_DIR=str(mesh_certs))
    yield running
    stop_process(running.process)


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, auth: AuthProcess, mesh_certs: Path, tmp_path: Path
) -> Iterator[tuple[list[Replica], SchedulerSettings]]:
    url = str(request.getfixturevalue("postgres_url"))
    env = scheduler_env(
        tmp_path / "unused",
        auth.address,
        AIDC_CERTS_DIR=str(mesh_certs),
        AIDC_DATABASE_URL=url,
        AIDC_LEADER_LEASE_SECONDS=str(LEASE_SECONDS),
        AIDC_SCHEDULER_METERING_INTERVAL_SECONDS="1",
        AIDC_SCHEDULER_JOBS_DIR=str(tmp_path / "jobs"),
        **master_keys(),
    )
    for name in ("AIDC_DATA_DIR", "AIDC_SCHEDULER_ADDR"):
        del env[name]
    running = start_replicas("scheduler", 2, tmp_path, env)
    yield running, SchedulerSettings.from_env({**env, "AIDC_DATA_DIR": str(tmp_path / "unused")})
    stop_replicas(running)


def _client(replica: Replica, certs: Path, token: str, via: str = "cli") -> SchedulerClient:
    settings = load_settings(MeshSettings, {"AIDC_CERTS_DIR": str(certs)})
    bearer = cast(grpc.aio.ClientInterceptor, BearerToken(token))
    return SchedulerClient(create_channel(replica.address, settings, identity=via, extra_interceptors=[bearer]))


def _usage(replicas: list[Replica]) -> dict[str, billing_pb.UsageEvent]:
    """Every usage event in the replicas' outboxes, by id; an id found twice must be the same event."""
    found: dict[str, billing_pb.UsageEvent] = {}
    for replica in replicas:
        path = replica.data_dir / "scheduler" / "usage-outbox.db"
        if not path.exists():
            continue
        with sqlite3.connect(path) as conn:
            for (payload,) in conn.execute("SELECT payload FROM outbox"):
                event = billing_pb.UsageEvent.FromString(payload)
                assert found.setdefault(event.id, event) == event, f"{event.id} emitted with different content"
    return found


async def test_the_follower_forwards_and_takes_over_when_the_leader_is_killed(
    cluster: tuple[list[Replica], SchedulerSettings], auth: AuthProcess, mesh_certs: Path
) -> None:
    replicas, settings = cluster
    url = settings.database_url
    leader = leader_of(url, replicas, "scheduler")
    assert leader is not None
    follower = next(r for r in replicas if r is not leader)
    assert (scrape_leader_gauge(leader, "scheduler"), scrape_leader_gauge(follower, "scheduler")) == (1, 0)

    admin = _client(follower, mesh_certs, await admin_token(auth))
    # As the training service submits for a user: its certificate, the user's token (both reach the leader).
    submitter = _client(follower, mesh_certs, await user_token(auth, "acme", "dev"), via="training")
    try:
        await set_quota(admin, "acme", 2 * CPU)
        long = (await submitter.submit_job(runner_command(150, 0.1), resources=resources(2 * CPU, GIB))).job
        queued = (await submitter.submit_job(runner_command(10, 0.1), resources=resources(2 * CPU, GIB))).job
        doomed = (await submitter.submit_job(runner_command(10, 0.1), resources=resources(2 * CPU, GIB))).job
        running = await wait_for(submitter, long.job_id, lambda j: len(runner_events(settings, j.job_id)) == 1)
        assert running.state == pb.JOB_STATE_RUNNING and running.submitted_by == "user:acme/dev"
        assert (await submitter.get_job(queued.job_id)).state == pb.JOB_STATE_QUEUED

        # A stream through the follower (the leader's WatchJobs, relayed) sees a cancel made through it.
        async def until_cancelled() -> list[int]:
            seen = []
            async for change in submitter.watch_jobs(job_ids=[doomed.job_id]):
                assert change.job.job_id == doomed.job_id
                seen.append(change.job.state)
                if change.job.state == pb.JOB_STATE_CANCELLED:
                    return seen
            return seen

        watching = asyncio.ensure_future(until_cancelled())
        await asyncio.sleep(0.5)  # the stream is open on the leader
        await submitter.cancel_job(doomed.job_id)
        assert (await asyncio.wait_for(watching, 30))[-1] == pb.JOB_STATE_CANCELLED
    finally:
        await admin.close()
        await submitter.close()

    # The leader has metered the running job (the failover must go on from what it metered, not from nothing).
    started = time.monotonic()
    while not any(e.attributes["job"] == long.job_id for e in _usage([leader]).values()):
        assert time.monotonic() - started < 60, "the leader never metered the running job"
        await asyncio.sleep(0.1)
    assert await kill_leader(url, replicas, "scheduler", leader, LEASE_SECONDS) is follower

    client = _client(follower, mesh_certs, await user_token(auth, "acme", "dev"))
    try:
        for job in (long, queued):
            done = await wait_for(client, job.job_id, lambda j: j.state == pb.JOB_STATE_SUCCEEDED, timeout=120)
            assert done.attempt == 1, done
            # Exactly once: the running job adopted by the new leader (never launched again), the queued one
            # launched by it.
            assert [(e["event"], e["attempt"]) for e in runner_events(settings, job.job_id)] == [
                ("start", 1),
                ("done", 1),
            ]
    finally:
        await client.close()
    assert scrape_leader_gauge(follower, "scheduler") == 1

    # Metered once: the core-seconds in both replicas' outboxes (duplicates only ever identical) are what each
    # allocation held, metered partly by the old leader and partly by the new one.
    await asyncio.sleep(2.5)  # the new leader's next metering tick
    usage = _usage(replicas)
    held = held_seconds(settings)
    for job in (long, queued):
        metered = sum(
            float(e.quantity)
            for e in usage.values()
            if e.meter == "cpu_core_seconds" and e.attributes["job"] == job.job_id
        )
        assert metered == pytest.approx(held[job.job_id]["cpu"], rel=1e-6), job.job_id
    sources = {replica.pid: bool(_usage([replica])) for replica in replicas}
    assert all(sources.values()), "both leaders metered: the old one before the kill, the new one after"
