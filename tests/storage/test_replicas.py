"""Two storage replicas (OS processes) on one PostgreSQL database and one bucket: both serve every tenant's objects,
the metering ticks run on the leader only, and when the leader is killed (SIGKILL: nothing released) the other
replica takes the ticks over within the lease's failover bound, with no span metered twice or left out."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.gen.aidc.billing.v1 import billing_service_pb2 as billing_pb
from tests.conftest import AuthProcess, start_auth_process, stop_process
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
from tests.storage.conftest import developer_client, storage_env
from tests.storage.seaweed import SeaweedFS

pytestmark = pytest.mark.slow

LEASE_SECONDS = 3.0
TICK_SECONDS = 1.0


@pytest.fixture
def auth(tmp_path: Path) -> Iterator[AuthProcess]:
    (tmp_path / "auth").mkdir()
    running = start_auth_process(tmp_path / "auth")
    yield running
    stop_process(running.process)


@pytest.fixture
def replicas(
    request: pytest.FixtureRequest, auth: AuthProcess, seaweed: SeaweedFS, tmp_path: Path
) -> Iterator[tuple[list[Replica], str]]:
    url = str(request.getfixturevalue("postgres_url"))
    env = storage_env(
        tmp_path / "unused",
        auth.address,
        seaweed,
        AIDC_DATABASE_URL=url,
        AIDC_LEADER_LEASE_SECONDS=str(LEASE_SECONDS),
        AIDC_STORAGE_METERING_INTERVAL_SECONDS=str(TICK_SECONDS),
        **master_keys(),
    )
    del env["AIDC_DATA_DIR"]
    running = start_replicas("storage", 2, tmp_path, env)
    yield running, url
    stop_replicas(running)


def _spans(replicas: list[Replica]) -> list[billing_pb.UsageEvent]:
    """Every usage event in every replica's outbox (a killed replica's too: its file stays)."""
    events = []
    for replica in replicas:
        path = replica.data_dir / "storage" / "usage-outbox.db"
        if path.exists():
            with sqlite3.connect(path) as conn:
                rows = conn.execute("SELECT payload FROM outbox ORDER BY seq").fetchall()
            events += [billing_pb.UsageEvent.FromString(row[0]) for row in rows]
    return events


async def test_the_metering_leader_fails_over_without_double_metering(
    replicas: tuple[list[Replica], str], auth: AuthProcess
) -> None:
    running, url = replicas
    a, b = running
    leader = leader_of(url, running, "storage")
    assert leader is not None
    follower = b if leader is a else a
    assert scrape_leader_gauge(leader, "storage-metering") == 1
    assert scrape_leader_gauge(follower, "storage-metering") == 0

    # Both replicas serve one tenant's objects: written through one, read through the other.
    writer, tenant = await developer_client(auth, follower.address, "acme", "dev")
    reader, _ = await developer_client(auth, leader.address, "acme", "dev")
    try:
        await writer.create_dataset(tenant, "corpus")
        await writer.upload(tenant, "corpus", b"x" * 4096)
        assert await reader.download_bytes(tenant, "corpus") == b"x" * 4096
    finally:
        await writer.close()
        await reader.close()
    await asyncio.sleep(3 * TICK_SECONDS)
    ticks_before = {event.id for event in _spans(running) if event.tenant == tenant}

    assert await kill_leader(url, running, "storage", leader, LEASE_SECONDS) is follower
    assert scrape_leader_gauge(follower, "storage-metering") == 1
    await asyncio.sleep(3 * TICK_SECONDS)

    events = [e for e in _spans(running) if e.tenant == tenant]
    assert len({e.id for e in events}) > len(ticks_before), "the new leader goes on ticking"
    # No span twice (an id re-sent is the same event, which billing counts once), none overlapping, no gap.
    by_id: dict[str, billing_pb.UsageEvent] = {}
    for event in events:
        assert by_id.setdefault(event.id, event) == event, f"{event.id} emitted with different content"
    spans = sorted((int(e.id.rsplit(":", 1)[1]), e.time.ToNanoseconds() + 1) for e in by_id.values())
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start == end, "spans are contiguous: nothing metered twice, nothing left out"
