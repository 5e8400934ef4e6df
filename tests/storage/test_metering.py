"""Storage metering: stored bytes integrated over time into billing's storage_gib_hours, exactly, across restarts
and crashes, never counted twice.

The unit tests drive a StorageMeter on a real storage database (SQLite) with a settable clock; its usage events
go to ``RecordingOutbox``, a fake of the billing usage outbox, and from there, where dedup matters, into a real
BillingCore. The integration test runs real auth, billing, storage and SeaweedFS with mutual TLS (the only way a
service can write usage), a metering interval of one second, and a restart of storage.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from fractions import Fraction
from pathlib import Path

import pytest

from services.auth.config import AuthSettings
from services.billing.client import BillingClient
from services.billing.core.model import EventStatus, UsageEvent, UsageQuery
from services.billing.outbox import UsageOutbox
from services.gen.aidc.billing.v1 import billing_service_pb2 as billing_pb
from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.mesh.certs import init_certificates
from services.mesh.db import open_database
from services.storage.config import StorageSettings
from services.storage.core.model import PendingUpload, VersionRecord
from services.storage.core.names import ObjectKind
from services.storage.core.usage import StorageUsage, UsageKind
from services.storage.metering import GIB, StorageMeter, next_point, span_event_id
from services.storage.schema import MIGRATIONS
from services.storage.store import MeteringPoint, StorageStore
from tests.billing.conftest import Clock, make_core, start_billing
from tests.conftest import start_auth
from tests.storage.conftest import start_storage, storage_env, user_tokens
from tests.storage.seaweed import SeaweedFS

#: 2025-03-10 12:00 UTC.
T0 = 1_741_608_000 * 10**9
SECOND = 10**9
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE


# -- an independent oracle -------------------------------------------------------------------------------


def exact_gib_hours(segments: Sequence[tuple[int, int]]) -> Fraction:
    """GiB-hours of (bytes, duration ns) segments, as an exact fraction."""
    return sum((Fraction(size * ns, GIB * 3600 * 10**9) for size, ns in segments), Fraction(0))


def to_9_decimals(value: Fraction) -> Decimal:
    """A fraction rounded half to even to 9 decimals."""
    with localcontext() as context:
        context.prec = 80
        return (Decimal(value.numerator) / Decimal(value.denominator)).quantize(
            Decimal("1e-9"), rounding=ROUND_HALF_EVEN
        )


def expected_spans(cumulative: Sequence[Fraction]) -> list[Decimal]:
    """What each emission must carry when the rounding residue is carried forward: the rounded running total
    minus what was emitted before (so the emitted total is always the exact total, rounded)."""
    out, emitted = [], Decimal(0)
    for total in cumulative:
        rounded = to_9_decimals(total)
        out.append(rounded - emitted)
        emitted = rounded
    return out


# -- the parts -------------------------------------------------------------------------------------------


class RecordingOutbox:
    """A fake of billing's UsageEmitter (a durable outbox the sender drains), standing in for the outbox only:
    it records the events written to it. ``crash_next`` makes the next write raise, as if the process died
    right before the outbox write."""

    source = "storage"

    def __init__(self) -> None:
        self.events: list[billing_pb.UsageEvent] = []
        self.crash_next = False

    def emit_events(self, events: Sequence[billing_pb.UsageEvent]) -> None:
        if self.crash_next:
            self.crash_next = False
            raise RuntimeError("simulated crash before the outbox write")
        self.events.extend(events)

    def quantities(self) -> list[Decimal]:
        return [Decimal(e.quantity) for e in self.events]


class CrashBeforeClear(StorageStore):
    """The real store, except that clearing due spans fails once (the process dies after the outbox write)."""

    crash_next = True

    def clear_metering_due(self, spans: Sequence[tuple[str, int]]) -> None:
        if self.crash_next:
            self.crash_next = False
            raise RuntimeError("simulated crash after the outbox write")
        super().clear_metering_due(spans)


@dataclass
class Volumes:
    """Sets tenants' stored bytes through the store's own upload and delete paths (no object store needed)."""

    store: StorageStore

    def put(self, tenant: str, size: int) -> VersionRecord:
        self.store.install_first_key(tenant, f"key-{tenant}")
        object_id = uuid.uuid4().hex
        s3_key = f"tenants/{tenant}/artifacts/{object_id}"
        now = datetime.now(UTC)
        self.store.add_pending(PendingUpload(object_id, tenant, s3_key, "test", now))
        record = VersionRecord(
            object_id=object_id,
            tenant=tenant,
            kind=ObjectKind.ARTIFACT,
            name=f"blob-{object_id[:8]}",
            version=1,
            s3_key=s3_key,
            size_bytes=size,
            stored_bytes=size,
            sha256="0" * 64,
            content_type="application/octet-stream",
            created_at=now,
            created_by=f"user:{tenant}/dev",
            format="",
            key_id=f"key-{tenant}",
            wrapped_key=b"wrapped",
        )
        self.store.commit_version(record)
        return record

    def delete(self, record: VersionRecord) -> None:
        self.store.delete_versions([record])


def usage(tenant: str, kind: UsageKind, size: int = 0) -> StorageUsage:
    """The event StorageCore reports (the meter reads the volume from the database itself)."""
    return StorageUsage(uuid.uuid4().hex, tenant, kind, size, 0, datetime.now(UTC))


def open_store(path: Path, cls: type[StorageStore] = StorageStore) -> StorageStore:
    db = open_database(f"sqlite:///{path}")
    db.migrate(MIGRATIONS, "storage")
    return cls(db)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StorageStore]:
    opened = open_store(tmp_path / "storage.db")
    yield opened
    opened.db.dispose()


def span_start(event: billing_pb.UsageEvent) -> int:
    return int(event.id.rsplit(":", 1)[1])


def event_time(event: billing_pb.UsageEvent) -> int:
    return event.time.seconds * 10**9 + event.time.nanos


# -- unit tests ------------------------------------------------------------------------------------------


async def test_uploads_deletes_and_ticks_emit_the_exact_gib_hours_of_each_span(store: StorageStore) -> None:
    clock, outbox, volumes = Clock(T0), RecordingOutbox(), Volumes(store)
    meter = StorageMeter(store, outbox, clock=clock)
    a, b = 5 * GIB + 123, 700 * 2**20 + 1

    first = volumes.put("acme", a)
    await meter.record(usage("acme", UsageKind.STORED, a))
    assert outbox.events == []  # the first volume starts the tenant's metering point

    clock.ns = T0 + 90 * MINUTE
    second = volumes.put("acme", b)
    await meter.record(usage("acme", UsageKind.STORED, b))
    clock.ns += 45 * MINUTE + 7 * SECOND + 3
    volumes.delete(first)
    await meter.record(usage("acme", UsageKind.DELETED, a))
    clock.ns += 5 * SECOND
    await meter.record(usage("acme", UsageKind.DOWNLOADED, b))  # downloads are not metered
    clock.ns = T0 + 3 * HOUR
    await meter.tick()
    clock.ns += 17 * MINUTE
    volumes.delete(second)
    await meter.record(usage("acme", UsageKind.DELETED, b))
    clock.ns += HOUR
    await meter.tick()  # nothing stored: nothing to bill

    segments = [
        (a, 90 * MINUTE),
        (a + b, 45 * MINUTE + 7 * SECOND + 3),
        (b, 3 * HOUR - (135 * MINUTE + 7 * SECOND + 3)),
        (b, 17 * MINUTE),
    ]
    cumulative = [exact_gib_hours(segments[: i + 1]) for i in range(len(segments))]
    assert outbox.quantities() == expected_spans(cumulative)
    # Each span starts where the previous one ended; events are dated at their span's last nanosecond.
    ends = [T0 + 90 * MINUTE, T0 + 135 * MINUTE + 7 * SECOND + 3, T0 + 3 * HOUR, T0 + 3 * HOUR + 17 * MINUTE]
    assert [span_start(e) for e in outbox.events] == [T0, *ends[:-1]]
    assert [event_time(e) for e in outbox.events] == [end - 1 for end in ends]
    for event in outbox.events:
        assert (event.source, event.tenant, event.meter, dict(event.attributes)) == (
            "storage",
            "acme",
            "storage_gib_hours",
            {},
        )
        assert event.id == span_event_id("acme", span_start(event))
    assert sum(outbox.quantities()) == to_9_decimals(cumulative[-1])
    await meter.close()


async def test_a_small_tenant_accrues_instead_of_rounding_to_zero(store: StorageStore) -> None:
    """1 KB is 2.6e-10 GiB-hours per second: every one-second span alone would round to zero."""
    clock, outbox, volumes = Clock(T0), RecordingOutbox(), Volumes(store)
    meter = StorageMeter(store, outbox, clock=clock, interval_seconds=1)
    volumes.put("tiny", 1000)
    await meter.record(usage("tiny", UsageKind.STORED, 1000))
    clock.ns += SECOND
    await meter.tick()
    assert outbox.events == []  # 0.26 billionths: the point stays where it was
    clock.ns += SECOND // 2
    volumes.put("tiny", 10_000)  # a volume change while nothing is billable yet is remembered, not lost
    await meter.record(usage("tiny", UsageKind.STORED, 10_000))
    assert outbox.events == []
    for _ in range(120):
        clock.ns += SECOND
        await meter.tick()

    last_end = event_time(outbox.events[-1]) + 1
    exact = exact_gib_hours([(1000, 3 * SECOND // 2), (11_000, last_end - T0 - 3 * SECOND // 2)])
    assert sum(outbox.quantities()) == to_9_decimals(exact) > 0
    assert span_start(outbox.events[0]) == T0  # the first emitted span reaches back to the start
    for before, after in zip(outbox.events, outbox.events[1:], strict=False):
        assert span_start(after) == event_time(before) + 1
    # Rounding each tick on its own, without accruing, would have billed nothing at 1000 bytes.
    assert to_9_decimals(exact_gib_hours([(1000, SECOND)])) == 0


async def test_a_new_meter_on_the_same_database_resumes_without_gap_or_overlap(tmp_path: Path) -> None:
    path = tmp_path / "storage.db"
    clock = Clock(T0)
    first_store = open_store(path)
    first_outbox = RecordingOutbox()
    first = StorageMeter(first_store, first_outbox, clock=clock)
    await first.start()
    Volumes(first_store).put("acme", 3 * GIB)
    await first.record(usage("acme", UsageKind.STORED))
    clock.ns = T0 + HOUR
    await first.tick()
    clock.ns = T0 + HOUR + 20 * MINUTE
    await first.close()  # stopped 20 minutes after its last tick, without metering them
    # While no meter runs, globex's bytes appear without a report (as if that report was lost in a crash).
    Volumes(first_store).put("globex", GIB)
    first_store.db.dispose()

    clock.ns = T0 + 2 * HOUR  # the service was down for 40 minutes; the bytes stayed stored
    second_store = open_store(path)
    second_outbox = RecordingOutbox()
    second = StorageMeter(second_store, second_outbox, clock=clock)
    await second.start()
    clock.ns = T0 + 3 * HOUR
    await second.tick()
    await second.close()

    events = first_outbox.events + second_outbox.events
    acme = [e for e in events if e.tenant == "acme"]
    assert [span_start(e) for e in acme] == [T0, T0 + HOUR, T0 + 2 * HOUR]
    assert [Decimal(e.quantity) for e in acme] == [Decimal(3)] * 3
    # globex had no point: it is metered from the second meter's start, not from when its bytes appeared.
    globex = [e for e in events if e.tenant == "globex"]
    assert [(span_start(e), Decimal(e.quantity)) for e in globex] == [(T0 + 2 * HOUR, Decimal(1))]
    second_store.db.dispose()


async def test_a_crash_around_the_outbox_write_neither_loses_nor_doubles_a_span(tmp_path: Path) -> None:
    """Both crash points: before the outbox write (the span was decided and saved as due) and after it (the due
    mark was not cleared). Every event goes through a real BillingCore, which must count each span once."""
    path = tmp_path / "storage.db"
    clock = Clock(T0)
    store = open_store(path, CrashBeforeClear)
    assert isinstance(store, CrashBeforeClear)
    store.crash_next = False
    outboxes = [RecordingOutbox()]
    meter = StorageMeter(store, outboxes[-1], clock=clock)
    Volumes(store).put("acme", 2 * GIB)
    await meter.start()

    clock.ns = T0 + HOUR
    outboxes[-1].crash_next = True
    with pytest.raises(RuntimeError, match="before the outbox write"):
        await meter.tick()
    assert outboxes[-1].events == []
    await meter.close()
    store.db.dispose()

    # Restart: the due span [T0, T0+1h) goes out first, exactly as it would have; then the process dies again
    # after writing the next span to the outbox, before clearing its due mark.
    clock.ns = T0 + HOUR + 30 * MINUTE
    store = open_store(path, CrashBeforeClear)
    outboxes.append(RecordingOutbox())
    meter = StorageMeter(store, outboxes[-1], clock=clock)
    with pytest.raises(RuntimeError, match="after the outbox write"):
        await meter.start()
    assert [(span_start(e), Decimal(e.quantity)) for e in outboxes[-1].events] == [
        (T0, Decimal(2)),
        (T0 + HOUR, Decimal(1)),
    ]
    store.db.dispose()

    # Restart again: the span still marked due is written once more (identical), then metering goes on.
    clock.ns = T0 + 2 * HOUR
    store = open_store(path)
    outboxes.append(RecordingOutbox())
    meter = StorageMeter(store, outboxes[-1], clock=clock)
    await meter.start()
    await meter.close()
    third = outboxes[-1].events
    assert [(span_start(e), Decimal(e.quantity)) for e in third] == [
        (T0 + HOUR, Decimal(1)),
        (T0 + HOUR + 30 * MINUTE, Decimal(1)),
    ]
    assert third[0] == outboxes[1].events[1]  # the same event, byte for byte: a duplicate to billing
    store.db.dispose()

    billing = make_core(tmp_path / "billing.db", Clock(T0 + 2 * HOUR))
    sent = [e for outbox in outboxes for e in outbox.events]
    results = billing.record_usage(
        [UsageEvent(e.source, e.id, e.tenant, e.meter, e.quantity, event_time(e), dict(e.attributes)) for e in sent]
    )
    accepted, duplicate = EventStatus.ACCEPTED, EventStatus.DUPLICATE
    assert [r.status for r in results] == [accepted, accepted, duplicate, accepted]
    (bucket,) = billing.query_usage(UsageQuery("acme", "storage_gib_hours", start_ns=T0, end_ns=T0 + 3 * HOUR)).items
    assert Decimal(bucket.value) == 4  # 2 GiB for exactly 2 hours: each span once


async def test_of_two_meters_closing_the_same_span_only_one_emits_it(store: StorageStore) -> None:
    """Replicas sharing one database: a meter that computed from a point another meter has moved since loses the
    compare-and-set and emits nothing."""
    clock = Clock(T0)
    Volumes(store).put("acme", GIB)
    winner_outbox, loser_outbox = RecordingOutbox(), RecordingOutbox()
    winner = StorageMeter(store, winner_outbox, clock=clock)
    await winner.tick()
    stale = store.metering_points()

    class StaleReads(StorageStore):
        def metering_points(self, tenant: str | None = None) -> list[MeteringPoint]:
            return stale  # read just before the winner saved

    loser = StorageMeter(StaleReads(store.db), loser_outbox, clock=clock)
    clock.ns = T0 + HOUR
    await winner.tick()
    await loser.tick()
    assert [(span_start(e), Decimal(e.quantity)) for e in winner_outbox.events] == [(T0, Decimal(1))]
    assert loser_outbox.events == []
    (point,) = store.metering_points()
    assert point.metered_until_ns == T0 + HOUR and point.due_span_start_ns is None


def test_quantities_are_exact_decimals_rounded_half_to_even() -> None:
    """One byte held for GIB * 3600 ns (about 3865 s) is a billionth of a GiB-hour, the smallest quantity; a
    span worth exactly half of one rounds to the even neighbour, and the residue is carried."""
    unit = GIB * 3600
    point = MeteringPoint("acme", 0, 0, 0, 1)
    cases = [(unit // 2, 0), (unit // 2 + 1, 1), (unit, 1), (3 * unit // 2, 2), (5 * unit // 2, 2), (7 * unit // 2, 4)]
    for elapsed, nanos in cases:
        new, span = next_point(point, "acme", elapsed, 1)
        assert (0 if span is None else span.quantity_nanos) == nanos, elapsed
        if span is None:
            assert new is None  # nothing billable and the volume unchanged: nothing to save
            continue
        assert span.quantity == Decimal(nanos).scaleb(-9) and (span.start_ns, span.end_ns) == (0, elapsed)
        assert new is not None and new.unbilled_byte_ns == elapsed - nanos * unit
        assert (new.metered_until_ns, new.due_span_start_ns, new.due_quantity_nanos) == (elapsed, 0, nanos)


# -- integration -----------------------------------------------------------------------------------------


async def _billed(billing_client: BillingClient, tenant: str) -> tuple[Decimal, int]:
    """(SUM, COUNT) of the tenant's storage_gib_hours in billing."""
    values = []
    for aggregation in (billing_pb.AGGREGATION_SUM, billing_pb.AGGREGATION_COUNT):
        response = await billing_client.query_usage("storage_gib_hours", tenant=tenant, aggregation=aggregation)
        values.append(Decimal(response.buckets[0].value) if response.buckets else Decimal(0))
    return values[0], int(values[1])


def _metering_state(settings: StorageSettings, tenant: str) -> tuple[int, int]:
    """(metered until ns, stored bytes) of ``tenant`` in the storage database of a stopped service."""
    store = StorageStore(open_database(settings.database_url_for("storage")))
    try:
        (point,) = store.metering_points(tenant)
        assert point.due_span_start_ns is None
        return point.metered_until_ns, store.stored_bytes(tenant)
    finally:
        store.db.dispose()


async def _metered_past(settings: StorageSettings, tenant: str, ns: int, timeout: float = 120.0) -> None:
    """Waits until the running service's meter has billed ``tenant`` up to ``ns`` (read from its database): the
    ticks are counted as they happen, however slowly a loaded machine runs them."""
    deadline = time.monotonic() + timeout
    while True:
        store = StorageStore(open_database(settings.database_url_for("storage")))
        try:
            until = max((p.metered_until_ns for p in store.metering_points(tenant)), default=0)
        finally:
            store.db.dispose()
        if until >= ns:
            return
        assert time.monotonic() < deadline, f"{tenant} metered until {until}, not {ns}, after {timeout}s"
        await asyncio.sleep(0.1)


def _gib_hours(size: int, ns: int) -> Decimal:
    return to_9_decimals(exact_gib_hours([(size, ns)]))


@pytest.mark.slow
async def test_billing_receives_storage_gib_hours_continuously_across_a_restart(
    settings: AuthSettings, seaweed: SeaweedFS, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    init_certificates(certs)
    auth = await start_auth(replace(settings, certs_dir=str(certs)))
    billing = await start_billing(auth, tmp_path / "billing-data", AIDC_CERTS_DIR=str(certs))
    billing_client = billing.client()
    try:
        tokens = await user_tokens(auth)
        env = storage_env(
            tmp_path / "storage-data",
            auth.address,
            seaweed,
            AIDC_CERTS_DIR=str(certs),
            AIDC_BILLING_ADDR=billing.address,
            AIDC_STORAGE_METERING_INTERVAL_SECONDS="1",
        )
        storage_settings = StorageSettings.from_env(env)
        storage = await start_storage(storage_settings, tokens)
        client = storage.client("acme/dev")
        before = time.time_ns()
        await client.upload("acme", "ckpt/weights.bin", b"\x5a" * (4 * 2**20), kind=pb.OBJECT_KIND_ARTIFACT)
        after = time.time_ns()
        # Five ticks of 1 s at least: long enough that the moment between the commit and the call's return (the 3%
        # below) stays small even when a loaded machine answers slowly.
        await _metered_past(storage_settings, "acme", after + 5 * SECOND)
        await storage.close()
        await storage.server.stop(0)  # flushes the usage outbox to billing

        until, size = _metering_state(storage_settings, "acme")
        billed, count = await _billed(billing_client, "acme")
        assert count >= 3 and billed > 0
        # The meter started when the upload committed, in [before, after]; it billed until its last tick.
        nano = Decimal("1e-9")
        assert _gib_hours(size, until - after) - nano <= billed <= _gib_hours(size, until - before) + nano
        # The commit is the last step of an upload (the first one here takes about a second: TLS handshakes, the
        # tenant's first key), so the volume times the time since the call returned is within a few percent.
        assert billed == pytest.approx(_gib_hours(size, until - after), rel=Decimal("0.03"))

        # A restart bills the time storage was down and goes on: continuous, with no span twice.
        await asyncio.sleep(0.5)
        restarted = time.time_ns()
        storage = await start_storage(storage_settings, tokens)
        await _metered_past(storage_settings, "acme", restarted + 2 * SECOND)  # the downtime, then two ticks
        await storage.close()
        await storage.server.stop(0)
        later_until, later_size = _metering_state(storage_settings, "acme")
        later_billed, later_count = await _billed(billing_client, "acme")
        assert later_size == size and later_until > until + SECOND and later_count >= count + 3
        # Everything since the first stop is exactly the volume times the time (up to the carried rounding).
        assert abs(later_billed - billed - _gib_hours(size, later_until - until)) <= nano
        outbox = UsageOutbox(storage_settings.data_dir / "storage" / "usage-outbox.db")
        assert outbox.pending() == 0 and outbox.dead_letters() == []
        outbox.close()
    finally:
        await billing_client.close()
        await billing.server.stop(0)
        await auth.server.stop(0)
