"""Benchmark of billing: idempotent usage ingest on SQLite in batches of 500 (goal >= 50,000 events/s) and
invoice computation over 1,000,000 events (goal < 10 s), each against a naive baseline measured in the same
run, with Lago's published REST batch ingest rate (~10,000 events/s) as an outside reference.

- Ingest, store level: BillingCore.record_usage (validation, dedup, ledger, rollups, one transaction per batch)
  against the layout RUNTIME.md calls naive: stdlib sqlite3 with a (source, id) text primary key and INSERT OR
  IGNORE. Both with random (UUIDv4) ids; ours also with time-ordered (UUIDv7) ids, which the dedup index is
  keyed to exploit. The naive insert does no validation, no conflict detection and no aggregation.
- Ingest, RPC level: RecordUsage to the billing service running as its own process (with auth), one batch in
  flight and four.
- Invoice: CreateInvoice's computation for one tenant whose month holds 1,000,000 events (priced from the hourly
  rollups kept at ingest), against a plain GROUP BY over the same raw rows; the totals must agree.

Run with `make bench` (or `python -m tests.bench.bench_billing`). Shared machines are noisy: compare ratios.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import cast

import grpc

from services.auth.client import AuthClient
from services.billing.client import BillingClient, new_event_id, usage_event
from services.billing.config import BillingSettings
from services.billing.core.model import DEFAULT_PLAN, UsageEvent
from services.billing.core.periods import HOUR_NS, month_start, next_month
from services.billing.core.pricebook import default_price_book
from services.billing.core.service import BillingCore, BillingPolicy
from services.billing.store import BillingStore
from services.cli.session import BearerToken
from services.gen.aidc.billing.v1 import billing_service_pb2 as pb
from services.mesh.channels import create_channel
from services.mesh.db import open_database
from tests.conftest import first_admin_login, free_port, service_env, start_service_process, stop_process, wait_serving

BATCH = 500
INGEST_EVENTS = int(os.environ.get("BENCH_BILLING_INGEST_EVENTS", "300000"))
INVOICE_EVENTS = int(os.environ.get("BENCH_BILLING_INVOICE_EVENTS", "1000000"))
RPC_EVENTS = int(os.environ.get("BENCH_BILLING_RPC_EVENTS", "100000"))
LAGO_EVENTS_PER_SECOND = 10_000  # Lago's published batch ingest rate (REST), for scale only

_MODELS = [f"model-{i:02d}" for i in range(20)]
_GPUS = ["nvidia-h100-80gb", "nvidia-a100-80gb", "nvidia-l4"]


def _workload(
    count: int, start_ns: int, span_ns: int, *, tenants: int, ordered_ids: bool, seed: int
) -> list[UsageEvent]:
    """A gateway's and a trainer's usage over ``span_ns``, in time order (as emitters deliver it)."""
    rng = random.Random(seed)
    step = span_ns // count
    events = []
    for i in range(count):
        at = start_ns + i * step + rng.randrange(step)
        tenant = f"tenant-{rng.randrange(tenants):02d}" if tenants > 1 else "acme"
        event_id = new_event_id(at) if ordered_ids else str(uuid.UUID(int=rng.getrandbits(128), version=4))
        kind = rng.random()
        if kind < 0.45:
            model = rng.choice(_MODELS)
            events.append(
                UsageEvent(
                    "serving", event_id, tenant, "inference_requests", "1", at, {"model": model, "request_id": event_id}
                )
            )
        elif kind < 0.9:
            model = rng.choice(_MODELS)
            ms = f"{rng.randrange(1, 400)}.{rng.randrange(1000):03d}"
            events.append(
                UsageEvent(
                    "serving",
                    event_id,
                    tenant,
                    "inference_compute_ms",
                    ms,
                    at,
                    {"model": model, "request_id": event_id},
                )
            )
        else:
            attributes = {"gpu_type": rng.choice(_GPUS), "job": f"job-{rng.randrange(50)}"}
            events.append(
                UsageEvent("training", event_id, tenant, "gpu_seconds", str(rng.randrange(1, 61)), at, attributes)
            )
    return events


def check_budget_seconds(core: BillingCore, calls: int = 10_000) -> float:
    """Mean time of one budget check (answered from memory, never the database: tests/billing/test_budgets.py)."""
    core.set_budget("acme", 10_000_000, "USD", enforce=True)
    started = time.perf_counter()
    for _ in range(calls):
        core.check_budget("acme", 1_000_000, "USD")
    return (time.perf_counter() - started) / calls


def _batches(events: Sequence[UsageEvent]) -> list[Sequence[UsageEvent]]:
    return [events[i : i + BATCH] for i in range(0, len(events), BATCH)]


def _fresh_core(directory: Path, now_ns: int) -> BillingCore:
    core = BillingCore(
        BillingStore(open_database(f"sqlite:///{directory / 'billing.db'}")),
        BillingPolicy(invoice_grace_seconds=0),
        clock=lambda: now_ns,
    )
    core.start()
    return core


def ingest_ours(events: Sequence[UsageEvent], directory: Path, now_ns: int) -> float:
    core = _fresh_core(directory, now_ns)
    batches = _batches(events)
    started = time.perf_counter()
    for batch in batches:
        core.record_usage(batch)
    elapsed = time.perf_counter() - started
    # 10% retried: all must come back as duplicates, nothing added.
    retried = core.record_usage(list(events[:: max(1, len(events) // 500)])[:BATCH])
    assert all(r.status.value == "duplicate" for r in retried)
    core._store.db.dispose()
    return len(events) / elapsed


def ingest_naive(events: Sequence[UsageEvent], directory: Path) -> float:
    """RUNTIME.md's floor: stdlib sqlite3, (source, id) text primary key, INSERT OR IGNORE, WAL, NORMAL."""
    conn = sqlite3.connect(directory / "naive.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE usage (source TEXT, id TEXT, tenant TEXT, meter TEXT, quantity TEXT, time INTEGER,"
        " attributes TEXT, PRIMARY KEY (source, id))"
    )
    rows = [
        (e.source, e.id, e.tenant, e.meter, e.quantity, e.time_ns, json.dumps(e.attributes, sort_keys=True))
        for e in events
    ]
    started = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        conn.execute("BEGIN")
        conn.executemany("INSERT OR IGNORE INTO usage VALUES (?, ?, ?, ?, ?, ?, ?)", rows[i : i + BATCH])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return len(events) / elapsed


def invoice_baseline(events: Sequence[UsageEvent], directory: Path, start_ns: int) -> tuple[float, int]:
    """The same month priced from a plain GROUP BY over raw rows (no rollups), with the default prices."""
    conn = sqlite3.connect(directory / "raw.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE raw (seq INTEGER PRIMARY KEY, tenant TEXT, meter TEXT, nanos INTEGER, time INTEGER, dims TEXT)"
    )
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO raw (tenant, meter, nanos, time, dims) VALUES (?, ?, ?, ?, ?)",
        (
            (
                e.tenant,
                e.meter,
                int(Fraction(e.quantity) * 10**9),
                e.time_ns,
                json.dumps({k: v for k, v in e.attributes.items() if k != "request_id"}, sort_keys=True),
            )
            for e in events
        ),
    )
    conn.execute("COMMIT")
    end = next_month(start_ns)
    started = time.perf_counter()
    groups = conn.execute(
        "SELECT meter, dims, SUM(nanos) FROM raw WHERE tenant = ? AND time >= ? AND time < ? GROUP BY meter, dims",
        ("acme", start_ns, end),
    ).fetchall()
    total = _price_groups(groups)
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed, total


def _price_groups(groups: Sequence[tuple[str, str, int]]) -> int:
    """Graduated tiers of the default on-demand plan over per-(meter, dims) sums."""
    plan = default_price_book("USD").plan(DEFAULT_PLAN)
    assert plan is not None
    per_entry: dict[tuple[str, tuple[tuple[str, str], ...]], int] = defaultdict(int)
    entries = {}
    for meter, dims, nanos in groups:
        price = plan.price_for(meter, json.loads(dims))
        assert price is not None
        per_entry[(meter, price.match)] += nanos
        entries[(meter, price.match)] = price
    total = 0
    for key, nanos in per_entry.items():
        for segment in entries[key].segments():
            high = nanos if segment.high is None else min(nanos, segment.high)
            if high > segment.low:
                total += round(
                    Fraction(high - segment.low, segment.price_per_quantity_nanos) * segment.unit_price_micros
                )
    return total


async def rpc_ingest(events: Sequence[UsageEvent], concurrency: int, client: BillingClient) -> float:
    messages = [
        usage_event(
            source=e.source,
            id=e.id,
            tenant=e.tenant,
            meter=e.meter,
            quantity=e.quantity,
            time_ns=e.time_ns,
            attributes=e.attributes,
        )
        for e in events
    ]
    batches = [messages[i : i + BATCH] for i in range(0, len(messages), BATCH)]
    queue: asyncio.Queue[list[pb.UsageEvent]] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)

    async def worker() -> None:
        while not queue.empty():
            results = await client.record_usage(queue.get_nowait(), timeout=60)
            assert all(r.status == pb.USAGE_EVENT_STATUS_ACCEPTED for r in results)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(events) / (time.perf_counter() - started)


async def bench_rpc(report: list[tuple[str, float, float, str]], now_ns: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        auth_addr, billing_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        env = service_env(data, AIDC_AUTH_ADDR=auth_addr, AIDC_BILLING_ADDR=billing_addr, AIDC_LOG_LEVEL="WARNING")
        auth = start_service_process("auth", env, data / "auth.log")
        billing = start_service_process("billing", env, data / "billing.log")
        try:
            wait_serving(auth_addr, process=auth)
            wait_serving(billing_addr, process=billing)
            settings = BillingSettings.from_env(env)
            password = first_admin_login(auth_addr, data)
            auth_client = AuthClient(create_channel(auth_addr, settings))
            token = (await auth_client.login("platform", "admin", password)).access_token
            await auth_client.close()
            bearer = cast(grpc.aio.ClientInterceptor, BearerToken(token))
            client = BillingClient(create_channel(billing_addr, settings, extra_interceptors=[bearer]))
            start = now_ns - 2 * 24 * HOUR_NS
            for concurrency, seed in ((1, 11), (4, 12)):
                events = _workload(RPC_EVENTS, start, 24 * HOUR_NS, tenants=10, ordered_ids=False, seed=seed)
                rate = await rpc_ingest(events, concurrency, client)
                report.append(
                    (
                        f"RecordUsage RPC, {concurrency} batch(es) in flight, random ids",
                        rate,
                        LAGO_EVENTS_PER_SECOND,
                        "Lago REST batch (published)",
                    )
                )
            await client.close()
        finally:
            stop_process(billing)
            stop_process(auth)


def main() -> None:
    now_ns = time.time_ns()
    report: list[tuple[str, float, float, str]] = []
    day = 24 * HOUR_NS

    with tempfile.TemporaryDirectory() as tmp:
        # -- ingest at the store level, same events for both sides ---------------------------------------
        random_ids = _workload(INGEST_EVENTS, now_ns - 3 * day, 2 * day, tenants=10, ordered_ids=False, seed=1)
        naive = ingest_naive(random_ids, Path(tmp))
        (Path(tmp) / "a").mkdir()
        ours_random = ingest_ours(random_ids, Path(tmp) / "a", now_ns)
        ordered = _workload(INGEST_EVENTS, now_ns - 3 * day, 2 * day, tenants=10, ordered_ids=True, seed=1)
        (Path(tmp) / "b").mkdir()
        ours_ordered = ingest_ours(ordered, Path(tmp) / "b", now_ns)
        label = f"({INGEST_EVENTS:,} events, batches of {BATCH})"
        report.append((f"ingest, core+store, random ids {label}", ours_random, naive, "sqlite3 text PK, random ids"))
        report.append((f"ingest, core+store, UUIDv7 ids {label}", ours_ordered, naive, "sqlite3 text PK, random ids"))
        report.append(
            (f"ingest, core+store, UUIDv7 ids {label}", ours_ordered, LAGO_EVENTS_PER_SECOND, "Lago REST batch")
        )
        del random_ids, ordered

    with tempfile.TemporaryDirectory() as tmp:
        # -- a month of one tenant's usage: 1,000,000 events, then its invoice ----------------------------
        period = month_start(month_start(now_ns) - 1)
        span = next_month(period) - period
        month = _workload(INVOICE_EVENTS, period, span, tenants=1, ordered_ids=True, seed=2)
        core = _fresh_core(Path(tmp), now_ns)
        started = time.perf_counter()
        for batch in _batches(month):
            core.record_usage(batch)
        load_rate = len(month) / (time.perf_counter() - started)
        report.append(
            (
                f"ingest, core+store, UUIDv7 ids, into {INVOICE_EVENTS:,}",
                load_rate,
                LAGO_EVENTS_PER_SECOND,
                "Lago REST batch",
            )
        )
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            invoice = core.create_invoice("acme", period)
            timings.append(time.perf_counter() - started)
        ours = statistics.median(timings)
        baseline, baseline_total = invoice_baseline(month, Path(tmp), period)
        assert invoice.total_micros == baseline_total, (invoice.total_micros, baseline_total)
        assert sum(line.event_count for line in invoice.lines) == INVOICE_EVENTS
        budget_check = check_budget_seconds(core)
        core._store.db.dispose()
        del month

    asyncio.run(bench_rpc(report, now_ns))

    print(f"{'benchmark':<66} {'aidc':>14} {'baseline':>14} {'ratio':>8}  baseline")
    for name, ours_rate, base_rate, label in report:
        print(f"{name:<66} {ours_rate:>10,.0f} ev/s {base_rate:>10,.0f} ev/s {ours_rate / base_rate:>7.2f}x  {label}")
    name = f"invoice over {INVOICE_EVENTS:,} events (goal < 10 s), totals equal"
    print(f"{name:<66} {ours:>12.3f} s {baseline:>12.3f} s {baseline / ours:>7.1f}x  plain GROUP BY over raw rows")
    name = f"CheckBudget in the core, a month of {INVOICE_EVENTS:,} events held (goal < 1 ms)"
    print(f"{name:<66} {budget_check * 1e6:>11.1f} us")


if __name__ == "__main__":
    main()
