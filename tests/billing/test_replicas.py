"""Two billing replicas (OS processes) on one PostgreSQL database behave as one: the same usage events recorded
through both at once are billed once, and a budget set through one replica is enforced by the other within
AIDC_BILLING_BUDGET_REFRESH_SECONDS. Mutual TLS as on the mesh (billing takes usage from services' certificates)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest
from sqlalchemy import create_engine, text

from services.billing.client import BillingClient, money, usage_event
from services.cli.session import BearerToken
from services.gen.aidc.billing.v1 import billing_service_pb2 as pb
from services.mesh.channels import create_channel
from services.mesh.config import MeshSettings, load_settings
from tests.conftest import AuthProcess, start_auth_process, stop_process
from tests.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures
from tests.replicas import Replica, admin_token, master_keys, start_replicas, stop_replicas

pytestmark = pytest.mark.slow

REFRESH_SECONDS = 1.0


@pytest.fixture
def mesh(mesh_certs: Path, tmp_path: Path) -> Iterator[AuthProcess]:
    (tmp_path / "auth").mkdir()
    auth = start_auth_process(tmp_path / "auth", AIDC_CERTS_DIR=str(mesh_certs))
    yield auth
    stop_process(auth.process)


@pytest.fixture
def replicas(
    request: pytest.FixtureRequest, mesh: AuthProcess, mesh_certs: Path, tmp_path: Path
) -> Iterator[tuple[list[Replica], str]]:
    url = str(request.getfixturevalue("postgres_url"))
    env = {
        "AIDC_DATABASE_URL": url,
        "AIDC_CERTS_DIR": str(mesh_certs),
        "AIDC_AUTH_ADDR": mesh.address,
        "AIDC_BILLING_BUDGET_REFRESH_SECONDS": str(REFRESH_SECONDS),
        **master_keys(),
    }
    running = start_replicas("billing", 2, tmp_path, env)
    yield running, url
    stop_replicas(running)


def _client(replica: Replica, certs: Path, identity: str, token: str = "") -> BillingClient:
    settings = load_settings(MeshSettings, {"AIDC_CERTS_DIR": str(certs)})
    interceptors = [cast(grpc.aio.ClientInterceptor, BearerToken(token))] if token else []
    return BillingClient(create_channel(replica.address, settings, identity=identity, extra_interceptors=interceptors))


async def test_the_same_events_through_both_replicas_at_once_are_billed_once(
    replicas: tuple[list[Replica], str], mesh_certs: Path
) -> None:
    (a, b), url = replicas
    now_ns = time.time_ns()
    events = [
        usage_event(
            source="serving",
            id=f"req-{n}",
            tenant="acme",
            meter="inference_requests",
            quantity=1,
            time_ns=now_ns - n * 1_000_000,
        )
        for n in range(400)
    ]
    clients = [_client(r, mesh_certs, "serving") for r in (a, b)]
    try:
        # Each replica gets the whole batch three times over, in differently ordered slices, all at once.
        calls = []
        for client in clients:
            for offset in (0, 130, 270):
                shuffled = events[offset:] + events[:offset]
                calls += [client.record_usage(shuffled[i : i + 100]) for i in range(0, len(shuffled), 100)]
        results = [r for batch in await asyncio.gather(*calls) for r in batch]
    finally:
        for client in clients:
            await client.close()
    accepted = [r.id for r in results if r.status == pb.USAGE_EVENT_STATUS_ACCEPTED]
    duplicates = [r for r in results if r.status == pb.USAGE_EVENT_STATUS_DUPLICATE]
    assert sorted(accepted) == sorted(e.id for e in events), "every event accepted exactly once"
    assert len(duplicates) == 5 * len(events)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT count(*) FROM billing_usage_events")).scalar_one()
            summed = conn.execute(text("SELECT sum(event_count) FROM billing_usage_rollups")).scalar_one()
    finally:
        engine.dispose()
    assert rows == len(events) and summed == len(events)


async def test_a_budget_set_through_one_replica_is_enforced_by_the_other(
    replicas: tuple[list[Replica], str], mesh_certs: Path, mesh: AuthProcess
) -> None:
    (a, b), _ = replicas
    token = await admin_token(mesh)
    admin_a = _client(a, mesh_certs, "cli", token)
    asking_b = _client(b, mesh_certs, "scheduler")
    try:
        estimate = money(2_000_000)
        assert (await asking_b.check_budget("acme", estimate)).allowed, "no budget yet: b caches an open view"
        started = time.monotonic()
        await admin_a.set_budget("acme", money(1_000_000), enforce=True)
        while (await asking_b.check_budget("acme", estimate)).allowed:
            assert time.monotonic() - started < REFRESH_SECONDS + 10, "b never learned of the budget"
            await asyncio.sleep(0.05)
        seen = time.monotonic() - started
        print(f"\nbudget set through one replica enforced by the other after {seen:.2f} s")
        assert seen <= REFRESH_SECONDS + 1.5
    finally:
        await admin_a.close()
        await asking_b.close()
