"""Leader election on the lease table, on SQLite and on PostgreSQL: one leader among contenders, its loops run only
there, a clean stop hands over within a third of the lease, an expired lease is taken, and a leader that cannot
renew stops its loops before its lease can expire in the database. (Killing a leader process: tests/replicas.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from services.mesh.db import Database, open_database
from services.mesh.leader import LeaderElection
from tests.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures

LEASE = 0.9


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = (
        f"sqlite:///{tmp_path / 'leases.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    )
    database = open_database(url)
    yield database
    database.dispose()


class Ticks:
    """A leader loop that records which replica ran it and when."""

    def __init__(self) -> None:
        self.by: list[tuple[str, float]] = []

    def loop(self, name: str) -> object:
        async def run() -> None:
            while True:
                self.by.append((name, time.monotonic()))
                await asyncio.sleep(0.02)

        return run


@pytest.fixture
async def pair(db: Database) -> AsyncIterator[tuple[LeaderElection, LeaderElection, Ticks]]:
    ticks = Ticks()
    elections = []
    for name in ("a", "b"):
        election = LeaderElection(db, "svc", lease_seconds=LEASE, holder=name, metrics=False)
        election.lead("tick", ticks.loop(name))  # type: ignore[arg-type]
        elections.append(election)
    for election in elections:
        await election.start()
    yield elections[0], elections[1], ticks
    for election in elections:
        await election.close()


async def test_one_leader_and_a_clean_handover(pair: tuple[LeaderElection, LeaderElection, Ticks]) -> None:
    a, b, ticks = pair
    assert a.is_leader and not b.is_leader, "the first to start leads at once"
    await asyncio.sleep(LEASE * 2)  # several renewals and tries
    assert a.is_leader and not b.is_leader
    assert {name for name, _ in ticks.by} == {"a"}
    assert b.lease is not None and b.lease.holder == "a" and not b.lease.ours

    stopped = time.monotonic()
    await a.close()
    await b.wait_until(True, timeout=LEASE)  # a clean stop: within a third of the lease (plus slack)
    handover = time.monotonic() - stopped
    assert handover <= LEASE / 3 + 0.3, handover
    assert b.lease is not None and b.lease.term == 2
    await asyncio.sleep(0.1)
    last_a = max(t for name, t in ticks.by if name == "a")
    first_b = min(t for name, t in ticks.by if name == "b")
    assert last_a < first_b, "the loop never ran on both at once"


async def test_an_expired_lease_is_taken(db: Database, pair: tuple[LeaderElection, LeaderElection, Ticks]) -> None:
    """The leader vanishes without a word (its campaign is cancelled, nothing released): the other takes over
    within the lease's lifetime plus a third of it."""
    a, b, ticks = pair
    assert a._task is not None
    a._task.cancel()  # a's process "dies": no renewal, no release (its loop is stopped by hand below)
    vanished = time.monotonic()
    await a._demote("test: process gone")
    await b.wait_until(True, timeout=LEASE * 3)
    assert time.monotonic() - vanished <= LEASE * 4 / 3 + 0.3


async def test_a_leader_that_cannot_renew_stops_before_its_lease_expires(
    db: Database, pair: tuple[LeaderElection, LeaderElection, Ticks]
) -> None:
    a, b, ticks = pair

    def unreachable() -> object:
        raise ConnectionError("database unreachable")

    a._acquire = unreachable  # type: ignore[method-assign]
    await a.wait_until(False, timeout=LEASE * 2)
    stopped = time.monotonic()
    await b.wait_until(True, timeout=LEASE * 3)
    # b only took over once a's lease expired in the database, i.e. after a had stopped its loops.
    last_a = max(t for name, t in ticks.by if name == "a")
    first_b = min(t for name, t in ticks.by if name == "b")
    assert last_a <= stopped < first_b


async def test_the_lease_row_is_one_per_service(
    db: Database, pair: tuple[LeaderElection, LeaderElection, Ticks]
) -> None:
    other = LeaderElection(db, "other-svc", lease_seconds=LEASE, holder="c", metrics=False)
    await other.start()
    try:
        assert other.is_leader, "another service's lease is its own"
    finally:
        await other.close()
    with db.engine.connect() as conn:
        rows = conn.execute(text("SELECT name, holder FROM leader_leases ORDER BY name")).all()
    assert [tuple(r) for r in rows] == [("other-svc", "c"), ("svc", "a")]
