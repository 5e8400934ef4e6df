"""Two serving replicas (OS processes) on one PostgreSQL database, in front of one real Triton: a Deploy through the
follower is forwarded to the leader, which rolls it out; both replicas' gateways serve the new version within
AIDC_SERVING_ROUTE_REFRESH_SECONDS; when the leader is killed (SIGKILL) the other takes its lease within the
failover bound and runs the next rollout, and both its gateway and its reconcile loop serve on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import grpc
import pytest

from services.cli.session import BearerToken
from services.gen.aidc.serving.v1 import serving_service_pb2 as pb
from services.mesh.channels import create_channel
from services.mesh.config import MeshSettings, load_settings
from services.mesh.errors import AidcError
from services.serving.client import ServingClient, TextClassifierClient
from tests.conftest import RunningAuth
from tests.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures
from tests.replicas import Replica, kill_leader, leader_of, scrape_leader_gauge, start_replicas, stop_replicas
from tests.serving.conftest import fine_tune, serving_env
from tests.serving.triton import TritonProcess
from tests.storage.conftest import RunningStorage
from tests.training.conftest import RunningTraining

pytestmark = pytest.mark.slow

LEASE_SECONDS = 3.0
ROUTE_REFRESH_SECONDS = 1.0
TEXT = ["the weather is great today"]
LOOP = "serving-deployments"


@pytest.fixture
async def replicas(
    request: pytest.FixtureRequest,
    auth: RunningAuth,
    storage: RunningStorage,
    training: RunningTraining,
    triton: TritonProcess,
    tmp_path: Path,
) -> AsyncIterator[tuple[list[Replica], str]]:
    url = str(request.getfixturevalue("postgres_url"))
    env = serving_env(
        tmp_path / "unused",
        auth.address,
        storage.address,
        training.settings.training_addr,
        triton,
        auth.settings.certs_dir,
        url,
    )
    env |= {
        "AIDC_LEADER_LEASE_SECONDS": str(LEASE_SECONDS),
        "AIDC_SERVING_ROUTE_REFRESH_SECONDS": str(ROUTE_REFRESH_SECONDS),
    }
    for name in ("AIDC_DATA_DIR", "AIDC_SERVING_ADDR"):
        del env[name]
    # In a thread: the replicas call auth, storage and training, which run on this event loop.
    running = await asyncio.to_thread(start_replicas, "serving", 2, tmp_path, env)
    yield running, url
    await asyncio.to_thread(stop_replicas, running)


def _channel(replica: Replica, auth: RunningAuth, token: str) -> grpc.aio.Channel:
    settings = load_settings(MeshSettings, {"AIDC_CERTS_DIR": auth.settings.certs_dir})
    bearer = cast(grpc.aio.ClientInterceptor, BearerToken(token))
    return create_channel(replica.address, settings, extra_interceptors=[bearer])


async def _serves(classifier: TextClassifierClient, version: str, timeout: float) -> float:
    """Seconds until ``classifier``'s replica answers with ``version`` of keywords-clf (AssertionError past
    ``timeout``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            [result] = await classifier.classify("keywords-clf", TEXT, version=version)
            assert result.label
            return time.monotonic() - started
        except AidcError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"version {version} not served within {timeout} s")


async def test_deploys_run_on_the_leader_every_replica_serves_and_the_other_takes_over(
    replicas: tuple[list[Replica], str],
    auth: RunningAuth,
    storage: RunningStorage,
    training: RunningTraining,
    tiny_bert_dir: Path,
) -> None:
    running, url = replicas
    assert await fine_tune(storage, training, tiny_bert_dir, seeds=(7, 8)) == [1, 2]
    leader = leader_of(url, running, "serving")
    assert leader is not None
    follower = next(r for r in running if r is not leader)
    assert (scrape_leader_gauge(leader, LOOP), scrape_leader_gauge(follower, LOOP)) == (1, 0)
    token = storage.tokens["acme/dev"]
    channels = {r.pid: _channel(r, auth, token) for r in running}
    try:
        # Through the follower: forwarded to the leader, which rolls it out.
        first = await ServingClient(channels[follower.pid]).deploy("keywords-clf", version=1, wait=True)
        assert (first.state, first.version) == (pb.DEPLOYMENT_STATE_READY, 1)
        # Both from the Deploy's return (the leader routed it then; the follower reads the routes periodically).
        bound = ROUTE_REFRESH_SECONDS + 30
        by_leader, by_follower = await asyncio.gather(
            *(_serves(TextClassifierClient(channels[r.pid]), "1", bound) for r in (leader, follower))
        )
        print(f"\nversion 1 served by the leader after {by_leader:.2f} s, the follower {by_follower:.2f} s")
        assert by_follower <= ROUTE_REFRESH_SECONDS + 5, "the follower's gateway took too long to route"

        assert await kill_leader(url, running, "serving", leader, LEASE_SECONDS) is follower
        assert scrape_leader_gauge(follower, LOOP) == 1

        # The new leader serves what the old one deployed, and runs the next rollout itself.
        classifier = TextClassifierClient(channels[follower.pid])
        await _serves(classifier, "1", 30)
        second = await ServingClient(channels[follower.pid]).deploy("keywords-clf", version=2, wait=True)
        assert (second.state, second.version) == (pb.DEPLOYMENT_STATE_READY, 2)
        await _serves(classifier, "2", ROUTE_REFRESH_SECONDS + 30)
        listed, _ = await ServingClient(channels[follower.pid]).list_deployments()
        assert [(d.model, d.version, d.state) for d in listed] == [("keywords-clf", 2, pb.DEPLOYMENT_STATE_READY)]
    finally:
        for channel in channels.values():
            await channel.close(None)
