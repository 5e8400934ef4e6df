"""Two training replicas (OS processes) on one PostgreSQL database, sharing the job directories (as on a cluster's
shared volume): a fine-tune submitted through the follower is forwarded to the leader, which follows it; when the
leader is killed mid-job (SIGKILL) the other takes its lease within the failover bound, follows the job on where the
relay stopped (the run goes on in the scheduler, never relaunched), and publishes exactly one model version."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import grpc
import pytest

from services.cli.session import BearerToken
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from services.gen.aidc.training.v1 import training_service_pb2 as pb
from services.mesh.channels import create_channel
from services.mesh.config import MeshSettings, load_settings
from services.training.client import TrainingClient
from services.training.core.service import JOB_LABEL
from tests.conftest import RunningAuth
from tests.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures
from tests.replicas import (
    Replica,
    kill_leader,
    leader_of,
    master_keys,
    scrape_leader_gauge,
    start_replicas,
    stop_replicas,
)
from tests.scheduler.service_support import RunningScheduler
from tests.storage.conftest import RunningStorage
from tests.training.conftest import keyword_spec, training_env, upload_keywords_and_tiny_bert
from tests.training.test_service import _progress_reaches, _states, _watch

pytestmark = pytest.mark.slow

LEASE_SECONDS = 3.0
LOOP = "training-jobs"


@pytest.fixture
async def replicas(
    request: pytest.FixtureRequest,
    auth: RunningAuth,
    storage: RunningStorage,
    scheduler: RunningScheduler,
    tmp_path: Path,
) -> AsyncIterator[tuple[list[Replica], str]]:
    url = str(request.getfixturevalue("postgres_url"))
    env = training_env(
        tmp_path / "unused",
        auth,
        storage.address,
        scheduler.address,
        AIDC_DATABASE_URL=url,
        AIDC_LEADER_LEASE_SECONDS=str(LEASE_SECONDS),
        AIDC_TRAINING_JOBS_DIR=str(tmp_path / "jobs"),
        AIDC_SHUTDOWN_GRACE_SECONDS="0.5",
        **master_keys(),
    )
    for name in ("AIDC_DATA_DIR", "AIDC_TRAINING_ADDR"):
        del env[name]
    # In a thread: the replicas call auth, storage and the scheduler, which run on this event loop.
    running = await asyncio.to_thread(start_replicas, "training", 2, tmp_path, env)
    yield running, url
    await asyncio.to_thread(stop_replicas, running)


def _client(replica: Replica, auth: RunningAuth, token: str) -> TrainingClient:
    settings = load_settings(MeshSettings, {"AIDC_CERTS_DIR": auth.settings.certs_dir})
    bearer = cast(grpc.aio.ClientInterceptor, BearerToken(token))
    return TrainingClient(create_channel(replica.address, settings, extra_interceptors=[bearer]))


async def test_a_job_submitted_through_the_follower_survives_its_leaders_death_and_publishes_once(
    replicas: tuple[list[Replica], str],
    auth: RunningAuth,
    storage: RunningStorage,
    scheduler: RunningScheduler,
    tiny_bert_dir: Path,
) -> None:
    running, url = replicas
    leader = leader_of(url, running, "training")
    assert leader is not None
    follower = next(r for r in running if r is not leader)
    assert (scrape_leader_gauge(leader, LOOP), scrape_leader_gauge(follower, LOOP)) == (1, 0)
    client = _client(follower, auth, storage.tokens["acme/dev"])
    try:
        # RegisterBaseModel and SubmitFineTune through the follower: forwarded to the leader.
        await upload_keywords_and_tiny_bert(storage.client("acme/dev"), client, tiny_bert_dir)
        job = await client.submit_fine_tune(keyword_spec(epochs=4), tenant="acme")
        before = await _progress_reaches(client, job.job_id, 5)  # relayed by the leader, read through the follower

        assert await kill_leader(url, running, "training", leader, LEASE_SECONDS) is follower
        assert scrape_leader_gauge(follower, LOOP) == 1

        events = await _watch(client, job.job_id)  # until the job ends, followed by the new leader
        final = await client.get_job(job.job_id, tenant="acme")
        assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
        # The run went on in the scheduler while the leader changed: never relaunched.
        admin = scheduler.client("platform/admin")
        [run] = [j for j in (await admin.list_jobs(labels={JOB_LABEL: job.job_id}))[0] if JOB_LABEL in j.labels]
        assert (run.attempt, run.state, final.attempt) == (1, scheduler_pb.JOB_STATE_SUCCEEDED, 1)
        # Every event once, in order: the new leader relayed on where the old one stopped.
        sequences = [e.sequence for e in events]
        assert sequences == sorted(set(sequences)), sequences
        steps = [e.progress.step for e in events if e.HasField("progress")]
        assert steps == sorted(set(steps)) and before in steps, steps
        assert [e.metrics.epoch for e in events if e.HasField("metrics")] == [0, 1, 2, 3]
        assert _states(events).count(pb.JOB_STATE_RUNNING) == 1
        assert _states(events).count(pb.JOB_STATE_SUCCEEDED) == 1
        versions = await client.list_model_versions("keywords-clf", tenant="acme")
        assert [(v.version, v.lineage.job_id) for v in versions] == [(1, job.job_id)]
    finally:
        await client.close()
