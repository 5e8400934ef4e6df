"""A scheduler replica leads once per process: its state (the queue, the policy's jobs and nodes) is loaded when it
starts leading and cannot be loaded again, so a replica promoted a second time (its lease lost and won back before
its stop, or a start that failed half-way and is retried) stops to restart instead of restoring its jobs twice."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as pb
from services.mesh.leader import LeaderElection
from services.scheduler import server as scheduler_server
from services.scheduler.client import resources
from tests.scheduler.service_support import GIB, RunningScheduler, runner_command, wait_state


@pytest.fixture
def elections(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[LeaderElection]]:
    """The scheduler's election, captured as the server builds it (request this before ``scheduler``)."""
    made: list[LeaderElection] = []
    build = LeaderElection.for_service

    def capture(*args: object, **kwargs: object) -> LeaderElection:
        election = build(*args, **kwargs)  # type: ignore[arg-type]
        made.append(election)
        return election

    monkeypatch.setattr(scheduler_server.LeaderElection, "for_service", capture)
    yield made


async def test_a_replica_promoted_again_stops_instead_of_restoring_its_jobs_twice(
    elections: list[LeaderElection], scheduler: RunningScheduler, caplog: pytest.LogCaptureFixture
) -> None:
    [election] = elections
    client = scheduler.submitter()
    job = (await client.submit_job(runner_command(600, 0.1), resources=resources(1000, GIB))).job
    await wait_state(client, job.job_id, [pb.JOB_STATE_RUNNING])
    stops: list[str] = []
    scheduler.server.request_stop = stops.append  # type: ignore[method-assign]
    caplog.set_level(logging.ERROR, logger="services.mesh.leader")
    await election._demote("the test took the lease away")
    assert stops == ["this replica lost the scheduler lease"]
    await election._try()  # the lease is still this replica's in the database: it leads again
    assert election.is_leader
    for _ in range(100):
        if len(stops) == 2:
            break
        await asyncio.sleep(0.05)
    assert stops[1:] == ["this replica led once already; it restarts to lead again"]
    await asyncio.sleep(1)  # a leader loop that failed would be logged at once
    assert not [r for r in caplog.records if "leader loop" in r.getMessage()], caplog.text
    await client.cancel_job(job.job_id)
