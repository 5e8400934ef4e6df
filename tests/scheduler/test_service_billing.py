"""The scheduler with the real billing service over mutual TLS (the only way a service may check budgets and write
usage): budget-aware admission, allocations metered as held, and pool prices carried into billing's price book."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from services.auth.config import AuthSettings
from services.billing.client import BillingClient, money
from services.billing.outbox import UsageOutbox
from services.gen.aidc.billing.v1 import billing_service_pb2 as billing_pb
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as pb
from services.mesh.certs import init_certificates
from services.mesh.db import open_database
from services.scheduler.client import prices, resources
from services.scheduler.config import SchedulerSettings
from services.scheduler.store import SchedulerStore
from tests.billing.conftest import RunningBilling, start_billing
from tests.conftest import RunningAuth, start_auth
from tests.scheduler.service_support import (
    GIB,
    RunningScheduler,
    runner_command,
    scheduler_env,
    start_scheduler,
    user_tokens,
    wait_for,
    wait_terminal,
)

CPU = 1000


@dataclass
class Mesh:
    auth: RunningAuth
    billing: RunningBilling
    scheduler: RunningScheduler
    billing_client: BillingClient
    certs: Path


@pytest.fixture
async def mesh(settings: AuthSettings, tmp_path: Path) -> AsyncIterator[Mesh]:
    certs = tmp_path / "certs"
    init_certificates(certs)
    auth = await start_auth(replace(settings, certs_dir=str(certs)))
    billing = await start_billing(auth, tmp_path / "billing-data", AIDC_CERTS_DIR=str(certs))
    tokens = await user_tokens(auth)
    env = scheduler_env(
        tmp_path / "scheduler-data",
        auth.address,
        AIDC_CERTS_DIR=str(certs),
        AIDC_BILLING_ADDR=billing.address,
        AIDC_SCHEDULER_METERING_INTERVAL_SECONDS="1",
    )
    scheduler = await start_scheduler(SchedulerSettings.from_env(env), tokens)
    client = billing.client()
    try:
        yield Mesh(auth, billing, scheduler, client, certs)
    finally:
        await client.close()
        await scheduler.stop()
        await billing.server.stop(0)
        await auth.server.stop(0)


async def test_a_job_over_budget_waits_with_billings_reason_and_runs_once_credit_is_granted(mesh: Mesh) -> None:
    await mesh.billing_client.set_budget("acme", None, prepaid=True)
    client = mesh.scheduler.submitter("acme/dev")
    job = (await client.submit_job(runner_command(2, 0.05), resources=resources(CPU, GIB), max_run_seconds=3600)).job
    waiting = await wait_for(client, job.job_id, lambda j: "budget" in j.state_reason, what="waiting for budget")
    assert waiting.state == pb.JOB_STATE_QUEUED
    assert "prepaid credit exhausted" in waiting.state_reason, waiting.state_reason
    await asyncio.sleep(1.5)  # several cycles and budget refreshes later it still waits
    assert (await client.get_job(job.job_id)).state == pb.JOB_STATE_QUEUED

    # 1 core and 1 GiB for an hour cost 0.045 USD at the default pool's prices.
    await mesh.billing_client.grant_credit("acme", "g-1", money(1_000_000))
    done = await wait_terminal(client, job.job_id, timeout=60)
    assert done.state == pb.JOB_STATE_SUCCEEDED
    assert done.estimated_cost.micros == 45_000


async def test_what_a_running_job_has_been_metered_is_not_reserved_again(mesh: Mesh) -> None:
    """Budget-aware admission reserves a running job's estimate less what of it has been metered to billing (which
    counts that as spent): with credit a little short of two jobs' estimates, a second job starts beside the first
    once the first has run a few seconds. Reserving the whole estimate again, it waited for the first to end."""
    await mesh.billing_client.set_budget("acme", None, prepaid=True)
    client = mesh.scheduler.submitter("acme/dev")
    # 1 core and 1 GiB for 40 s: estimated at 500 micros (12.5 a second) at the default pool's prices.
    estimate = 500
    await mesh.billing_client.grant_credit("acme", "g-1", money(2 * estimate - 50))
    first = (await client.submit_job(runner_command(350, 0.1), resources=resources(CPU, GIB), max_run_seconds=40)).job
    await wait_for(client, first.job_id, lambda j: j.state == pb.JOB_STATE_RUNNING, what="the first job running")
    assert (await client.get_job(first.job_id)).estimated_cost.micros == estimate
    second = (await client.submit_job(runner_command(2, 0.05), resources=resources(CPU, GIB), max_run_seconds=40)).job
    admitted = await wait_for(
        client, second.job_id, lambda j: j.state != pb.JOB_STATE_QUEUED, what="the second job admitted", timeout=25
    )
    assert admitted.state != pb.JOB_STATE_FAILED, admitted.state_reason
    assert (await client.get_job(first.job_id)).state == pb.JOB_STATE_RUNNING, "the first job had ended"
    await client.cancel_job(first.job_id)
    for job in (first, second):
        await wait_terminal(client, job.job_id)


async def test_each_allocation_is_billed_for_the_time_it_was_held(mesh: Mesh) -> None:
    client = mesh.scheduler.submitter("acme/dev")
    jobs = [
        (await client.submit_job(runner_command(25, 0.1), resources=resources(1500, 2 * GIB), workers=2)).job,
        (await client.submit_job(runner_command(15, 0.1), resources=resources(CPU, GIB))).job,
    ]
    for job in jobs:
        assert (await wait_terminal(client, job.job_id)).state == pb.JOB_STATE_SUCCEEDED
    held = held_seconds(mesh.scheduler.settings)
    await assert_billed_as_held(mesh.billing_client, "acme", held, mesh.scheduler.settings)
    # A 2-worker gang of 1.5 cores holds 3 cores.
    two_workers = held[jobs[0].job_id]
    assert two_workers["cpu"] == pytest.approx(3 * two_workers["seconds"], rel=1e-6)


async def test_pool_prices_reach_the_price_book_from_its_next_version(mesh: Mesh) -> None:
    admin = mesh.scheduler.client("platform/admin")
    before = await mesh.billing_client.get_price_book()
    pool = await admin.create_pool(
        pb.Pool(name="gpu-a100", prices=prices(80_000, 5_000, {"nvidia-a100-80gb": 3_000_000}))
    )
    assert pool.prices.cpu_core_hour.micros == 80_000
    after = await mesh.billing_client.get_price_book(at=datetime.now(UTC) + timedelta(hours=1, minutes=1))
    assert after.version == before.version + 1
    plans = {p.name: p for p in after.plans}
    cpu = _entry(plans["on-demand"], "cpu_core_seconds", {"pool": "gpu-a100"})
    gpu = _entry(plans["on-demand"], "gpu_seconds", {"pool": "gpu-a100", "gpu_type": "nvidia-a100-80gb"})
    assert (cpu.tiers[0].unit_price.micros, cpu.tiers[0].price_per_quantity) == (80_000, "3600")
    assert gpu.tiers[0].unit_price.micros == 3_000_000
    # The committed plan keeps its 25% discount on the pool's prices.
    assert _entry(plans["committed-10k"], "cpu_core_seconds", {"pool": "gpu-a100"}).tiers[0].unit_price.micros == 60_000
    # Memory at the book's own price needs no entry: the catch-all applies.
    assert not [p for p in plans["on-demand"].prices if p.meter == "memory_gib_seconds" and p.match]

    # The same prices again change nothing in billing.
    same = prices(80_000, 5_000, {"nvidia-a100-80gb": 3_000_000})
    await admin.update_pool(pb.Pool(name="gpu-a100", prices=same), ["prices"])
    again = await mesh.billing_client.get_price_book(at=datetime.now(UTC) + timedelta(hours=1, minutes=1))
    assert again.version == after.version


def _entry(plan: billing_pb.Plan, meter: str, match: dict[str, str]) -> billing_pb.MeterPrice:
    [entry] = [p for p in plan.prices if p.meter == meter and dict(p.match) == match]
    return entry


# -- helpers shared with the restart test ---------------------------------------------------------------------


def held_seconds(settings: SchedulerSettings) -> dict[str, dict[str, float]]:
    """Per job, from the scheduler's own records: seconds held (admission -> release, summed over attempts), and
    the core-seconds and GiB-seconds that holding is."""
    db = open_database(settings.database_url_for("scheduler"))
    try:
        out: dict[str, dict[str, float]] = {}
        for allocation in SchedulerStore(db).open_allocations() + _closed(SchedulerStore(db)):
            assert allocation.released_ns, f"{allocation.job_id} still holds its allocation"
            seconds = (allocation.released_ns - allocation.admitted_ns) / 1e9
            workers = len(allocation.nodes)
            entry = out.setdefault(allocation.job_id, {"seconds": 0.0, "cpu": 0.0, "memory": 0.0})
            entry["seconds"] += seconds
            entry["cpu"] += seconds * workers * allocation.per_worker.cpu_millicores / 1000
            entry["memory"] += seconds * workers * allocation.per_worker.memory_bytes / GIB
        return out
    finally:
        db.dispose()


def _closed(store: SchedulerStore) -> list:  # type: ignore[type-arg]
    found = []
    for job in store.jobs(""):
        found += [a for a in store.allocations_of(job.job_id) if a.released_ns and a.metered_until_ns >= a.released_ns]
    return found


async def billed(billing: BillingClient, tenant: str, meter: str) -> dict[str, Decimal]:
    buckets = await billing.all_usage_buckets(meter, tenant=tenant, group_by=["job"])
    return {b.group["job"]: Decimal(b.value) for b in buckets if b.group.get("job")}


async def assert_billed_as_held(
    billing: BillingClient, tenant: str, held: dict[str, dict[str, float]], settings: SchedulerSettings
) -> float:
    """Billing's cpu_core_seconds and memory_gib_seconds of each job equal its held time within 1 % (polling while
    the usage outbox drains), and the outbox rejected nothing (no event was emitted twice with other content).
    Returns the largest relative difference seen."""
    deadline = time.monotonic() + 60
    while True:
        cpu = await billed(billing, tenant, "cpu_core_seconds")
        memory = await billed(billing, tenant, "memory_gib_seconds")
        ok = all(
            job in cpu
            and abs(float(cpu[job]) - h["cpu"]) <= 0.01 * h["cpu"]
            and abs(float(memory.get(job, 0)) - h["memory"]) <= 0.01 * h["memory"]
            for job, h in held.items()
        )
        if ok and set(cpu) == set(held):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"billed {cpu} / {memory}, held {held}")
        await asyncio.sleep(0.5)
    outbox = UsageOutbox(settings.data_dir / "scheduler" / "usage-outbox.db")
    try:
        assert outbox.dead_letters() == []
    finally:
        outbox.close()
    worst = 0.0
    for job, h in held.items():
        worst = max(
            worst, abs(float(cpu[job]) - h["cpu"]) / h["cpu"], abs(float(memory[job]) - h["memory"]) / h["memory"]
        )
    return worst
