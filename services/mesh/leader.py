"""Leader election among the replicas of a service: a lease row in the service's own database, so the background
loops that must run once (metering ticks, reconcile loops, the scheduler's cycle) run on one replica at a time.

The lease (table ``leader_leases``, one row per service) names its holder and expires at a time of the database's
own clock (replicas' clocks may disagree; the database's is the only one compared). The holder renews it every
third of its lifetime; any other replica tries every third of it and takes the lease once it has expired. A leader
that could not renew in time stops its loops before the lease can expire in the database (it counts the lifetime
from before it sent the renewal), so two replicas never lead at once. On a clean stop the leader releases the lease
and another replica takes over at its next try.

Failover bounds, with ``lease_seconds`` L (AIDC_LEADER_LEASE_SECONDS): after a clean stop, at most L/3; after the
leader's process or machine died, at most L + L/3 (the lease outlives its last renewal by at most L, then the next
try takes it); a leader restarted at its own address leads again at once. Each term carries a number that grows
with every new holder (a fencing token for logs).

Works the same on SQLite (replicas on one machine sharing the file) and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge
from sqlalchemy import BigInteger, Column, Float, MetaData, String, Table, select, text, update
from sqlalchemy.exc import IntegrityError

from services.mesh.config import MeshSettings
from services.mesh.db import Database
from services.mesh.metrics import child, metrics_enabled

__all__ = ["LeaderElection", "Lease", "leases_table"]

log = logging.getLogger(__name__)

_meta = MetaData()
leases_table = Table(
    "leader_leases",
    _meta,
    Column("name", String(128), primary_key=True),
    Column("holder", String(200), nullable=False),
    #: Where the holder serves (host:port), for replicas that forward to it.
    Column("address", String(256), nullable=False),
    Column("term", BigInteger, nullable=False),
    #: The database clock's seconds since the epoch.
    Column("expires_at", Float, nullable=False),
)

LEADING = Gauge(
    "aidc_leader",
    "1 while this replica runs the background loop as its service's leader, else 0.",
    ["loop"],
)
CHANGES = Counter("aidc_leader_changes_total", "Times this replica became or stopped being its service's leader.")
#: How long a demoted leader waits for its cancelled loops to stop.
_STOP_SECONDS = 30.0


@dataclass(frozen=True)
class Lease:
    """The lease as last read: who holds it, where it serves, its term, and whether it is ours."""

    holder: str
    address: str
    term: int
    ours: bool


def _now_sql(db: Database) -> str:
    if db.is_sqlite:
        return "((julianday('now') - 2440587.5) * 86400.0)"
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


def default_holder() -> str:
    """This process's name in the lease: host, pid and a random part (a restarted process is a new holder)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LeaderElection:
    """One service's lease (see the module docstring) and the loops that run only while this replica holds it.

    ``lead(loop, work)`` registers a loop: ``work()`` is started as a task each time this replica becomes leader and
    cancelled when it stops being leader (or closes); if it fails it is started again after a pause.
    """

    def __init__(
        self,
        db: Database,
        name: str,
        *,
        lease_seconds: float,
        address: str = "",
        holder: str | None = None,
        metrics: bool = True,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self._db = db
        self.name = name
        self.holder = holder or default_holder()
        self._address = address
        self.lease_seconds = lease_seconds
        self._metrics = metrics
        self._now = _now_sql(db)
        self._loops: dict[str, Callable[[], Awaitable[None]]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._valid_until = 0.0  # monotonic; while leader
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self.is_leader = False
        self.lease: Lease | None = None

    @classmethod
    def for_service(cls, db: Database, settings: MeshSettings, service: str) -> LeaderElection:
        """The election among ``service``'s replicas, on its database, with the mesh's lease lifetime, advertising
        where this replica serves."""
        return cls(
            db,
            service,
            lease_seconds=settings.leader_lease_seconds,
            address=settings.advertise_addr or settings.address_of(service),
            metrics=metrics_enabled(settings),
        )

    # -- registration and lifecycle ----------------------------------------------------------------------------

    def lead(self, loop: str, work: Callable[[], Awaitable[None]]) -> None:
        """Runs ``work`` while this replica leads (call before ``start``)."""
        if loop in self._loops:
            raise ValueError(f"loop {loop!r} is registered already")
        self._loops[loop] = work
        child(self._metrics, LEADING, loop).set(0)

    async def start(self) -> None:
        """Creates the lease table if needed, makes a first try (a lone replica leads at once), then keeps trying
        or renewing in the background."""
        if self._task is not None:
            return
        await self._db.run(self._create_table)
        await self._try()
        self._task = asyncio.create_task(self._campaign(), name=f"leader-{self.name}")

    async def close(self) -> None:
        """Stops the loops and releases the lease (another replica takes over at its next try)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        was_leader = self.is_leader
        await self._demote("closing")
        if was_leader:
            with contextlib.suppress(Exception):
                await self._db.run(self._release)

    async def wait_until(self, leader: bool, timeout: float) -> None:
        """Waits until this replica leads (or does not), for tests and start-up ordering."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.is_leader == leader), timeout)

    # -- the campaign ------------------------------------------------------------------------------------------

    @property
    def _interval(self) -> float:
        return self.lease_seconds / 3

    async def _campaign(self) -> None:
        while True:
            delay = self._interval
            if self.is_leader:  # wake up no later than the lease's end, to stop leading if it was not renewed
                delay = min(delay, max(self._valid_until - time.monotonic(), 0.0))
            await asyncio.sleep(delay)
            if self.is_leader and time.monotonic() >= self._valid_until:
                await self._demote("the lease was not renewed in time")
            await self._try()

    async def _try(self) -> None:
        """One renewal (leader) or one attempt to take the lease (follower)."""
        sent = time.monotonic()
        try:
            if self.is_leader:
                # The lease is ours until the database's expiry; never wait past our own estimate of it.
                lease = await asyncio.wait_for(self._db.run(self._acquire), max(self._valid_until - sent, 0.01))
            else:
                lease = await self._db.run(self._acquire)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a database hiccup: as leader keep going while the lease is valid
            if self.is_leader and time.monotonic() >= self._valid_until:
                await self._demote(f"could not renew the lease: {exc}")
            elif self.is_leader:
                log.warning("renewing the %s lease failed (%s); retrying while it is valid", self.name, exc)
            else:
                log.info("trying for the %s lease failed: %s", self.name, exc)
            return
        self.lease = lease
        if lease.ours:
            # Counted from before the renewal was sent (the database set its expiry later than that), less a margin
            # for clocks running at slightly different rates.
            self._valid_until = sent + self.lease_seconds * 0.95
            if not self.is_leader:
                await self._promote(lease)
        elif self.is_leader:
            await self._demote(f"the lease is held by {lease.holder}")

    async def _promote(self, lease: Lease) -> None:
        self.is_leader = True
        CHANGES.inc() if self._metrics else None
        log.info("%s: this replica (%s) leads now (term %d)", self.name, self.holder, lease.term)
        for loop, work in self._loops.items():
            self._running[loop] = asyncio.create_task(self._keep_running(loop, work), name=f"{self.name}-{loop}")
            child(self._metrics, LEADING, loop).set(1)
        async with self._changed:
            self._changed.notify_all()

    async def _demote(self, reason: str) -> None:
        if not self.is_leader:
            return
        self.is_leader = False
        CHANGES.inc() if self._metrics else None
        log.warning("%s: this replica (%s) no longer leads: %s", self.name, self.holder, reason)
        tasks = list(self._running.items())
        self._running.clear()
        for _, task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a loop that does not stop when cancelled is a bug to report, not a reason to hang a close.
            _, pending = await asyncio.wait([task for _, task in tasks], timeout=_STOP_SECONDS)
            for loop, task in tasks:
                if task in pending:
                    log.error(
                        "%s: leader loop %s did not stop within %g s of its cancel", self.name, loop, _STOP_SECONDS
                    )
                child(self._metrics, LEADING, loop).set(0)
        async with self._changed:
            self._changed.notify_all()

    async def _keep_running(self, loop: str, work: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await work()
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a leader's loop must not die for good on one failure
                log.exception("%s: leader loop %s failed; starting it again", self.name, loop)
            await asyncio.sleep(self._interval)

    # -- the database ------------------------------------------------------------------------------------------

    def _create_table(self) -> None:
        with self._db.exclusive("migrations"):
            _meta.create_all(self._db.engine, tables=[leases_table])

    def _acquire(self) -> Lease:
        """Renews our lease or takes an expired one (one conditional UPDATE: of two replicas trying at once, one
        wins); inserts the row on first use. Returns the lease as it now is.

        A lease held at this replica's own address is taken at once: its holder was this replica's previous process
        (restarted by its supervisor, or a container restarted in its pod), which is gone, since two processes don't
        serve one address. So a lone replica's restart after a crash doesn't wait for its old lease to expire."""
        params = {"name": self.name, "holder": self.holder, "address": self._address, "ttl": self.lease_seconds}
        with self._db.engine.begin() as conn:
            taken = conn.execute(
                text(
                    "UPDATE leader_leases SET holder = :holder, address = :address, "
                    "term = CASE WHEN holder = :holder THEN term ELSE term + 1 END, "
                    f"expires_at = {self._now} + :ttl "
                    f"WHERE name = :name AND (holder = :holder OR expires_at < {self._now} "
                    "OR (address = :address AND address <> ''))"
                ),
                params,
            ).rowcount
        if not taken:
            try:
                with self._db.engine.begin() as conn:
                    conn.execute(
                        text(
                            "INSERT INTO leader_leases (name, holder, address, term, expires_at) "
                            f"VALUES (:name, :holder, :address, 1, {self._now} + :ttl)"
                        ),
                        params,
                    )
            except IntegrityError:
                pass  # the row exists: someone else holds the lease
        with self._db.engine.connect() as conn:
            row = conn.execute(
                select(leases_table.c.holder, leases_table.c.address, leases_table.c.term).where(
                    leases_table.c.name == self.name
                )
            ).one()
        return Lease(row.holder, row.address, int(row.term), row.holder == self.holder)

    def _release(self) -> None:
        with self._db.engine.begin() as conn:
            conn.execute(
                update(leases_table)
                .where(leases_table.c.name == self.name, leases_table.c.holder == self.holder)
                .values(expires_at=0.0)
            )
