"""The UsageEmitter and its durable outbox against the real service: usage emitted while billing is down is
delivered once it is up, survives an emitter crash and restart, is never counted twice, and what billing
rejects is kept in a dead-letter table."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path
from typing import cast

import grpc
import pytest

from services.billing.client import BillingClient, UsageEmitter, new_event_id
from services.cli.session import BearerToken
from services.gen.aidc.billing.v1 import billing_service_pb2 as pb
from services.mesh.channels import create_channel
from services.mesh.errors import InvalidArgument
from tests.billing.conftest import RunningBilling, billing_settings, start_billing
from tests.conftest import RunningAuth

FAST = {"flush_interval_seconds": 0.05, "initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.3}


async def _totals(client: BillingClient, meter: str = "inference_requests") -> tuple[str, str]:
    """(SUM, COUNT) of a meter for acme over all time."""
    values = []
    for aggregation in (pb.AGGREGATION_SUM, pb.AGGREGATION_COUNT):
        response = await client.query_usage(meter, tenant="acme", aggregation=aggregation)
        values.append(response.buckets[0].value if response.buckets else "0")
    return values[0], values[1]


async def _token(auth: RunningAuth) -> str:
    return (await auth.client().login("platform", "admin", auth.admin_password)).access_token


async def test_usage_emitted_during_an_outage_and_across_an_emitter_restart_arrives_once(
    auth: RunningAuth, tmp_path: Path
) -> None:
    settings = billing_settings(auth, tmp_path / "billing-data")
    token = await _token(auth)
    outbox = tmp_path / "serving" / "usage-outbox.db"

    def emitter() -> UsageEmitter:
        channel = create_channel(
            settings.billing_addr, settings, extra_interceptors=[cast(grpc.aio.ClientInterceptor, BearerToken(token))]
        )
        return UsageEmitter(outbox, BillingClient(channel, timeout_seconds=1.0), source="serving", **FAST)

    # Billing is down: events pile up in the outbox while the sender backs off.
    first = emitter()
    await first.start()
    start = time.time_ns()
    for i in range(120):
        first.emit(
            "inference_requests",
            Decimal("1.5"),
            tenant="acme",
            id=f"req-{i}",
            time_ns=start + i,
            attributes={"model": "bert"},
        )
    for _ in range(600):  # until the sender tried (and failed) to deliver, however loaded the machine
        if first.stats.failures:
            break
        await asyncio.sleep(0.05)
    assert first.pending() == 120 and first.stats.failures >= 1 and first.stats.accepted == 0

    # The emitting process dies without flushing: its sender is gone, its outbox file remains.
    assert first._task is not None
    first._task.cancel()
    await asyncio.gather(first._task, return_exceptions=True)
    await first.client.close()

    # Billing comes up at its address; a new emitter on the same outbox delivers everything, once.
    running = await start_billing(auth, tmp_path / "billing-data", AIDC_BILLING_ADDR=settings.billing_addr)
    second = emitter()
    try:
        await second.start()
        second.emit("inference_requests", 2, tenant="acme", id="req-after-restart")
        await second.flush(timeout=10)
        assert second.pending() == 0 and second.stats.accepted == 121
        # Emitting the same usage again (a replayed outbox) changes nothing.
        for i in range(120):
            second.emit(
                "inference_requests",
                "1.5",
                tenant="acme",
                id=f"req-{i}",
                time_ns=start + i,
                attributes={"model": "bert"},
            )
        await second.flush(timeout=10)
        assert second.stats.duplicates == 120 and second.pending() == 0
        client = running.client()
        assert await _totals(client) == ("182", "121")
        await client.close()
    finally:
        await second.close()
        await running.server.stop(0)


async def test_rejected_usage_goes_to_the_dead_letter_table(billing: RunningBilling, tmp_path: Path) -> None:
    emitter = UsageEmitter(tmp_path / "outbox.db", billing.client(), source="training", **FAST)
    await emitter.start()
    try:
        emitter.emit("gpu_seconds", "60", tenant="acme", id="ok", attributes={"gpu_type": "nvidia-l4"})
        emitter.emit("gpu_hours", "1", tenant="acme", id="bad-meter")
        emitter.emit("gpu_seconds", "60", tenant="acme", id="ok")  # same id, other attributes: a conflict
        await emitter.flush(timeout=10)
        assert emitter.pending() == 0
        dead = {pb.UsageEvent.FromString(d.payload).id: d.reason for d in emitter.dead_letters()}
        assert set(dead) == {"bad-meter", "ok"}
        assert "unknown meter" in dead["bad-meter"] and "conflicting duplicate" in dead["ok"]
        assert emitter.stats.accepted == 1 and emitter.stats.rejected == 2
    finally:
        await emitter.close()


async def test_emitters_refuse_floats_and_foreign_sources(billing: RunningBilling, tmp_path: Path) -> None:
    emitter = UsageEmitter(tmp_path / "outbox.db", billing.client(), source="serving")
    with pytest.raises(TypeError, match="never a float"):
        emitter.emit("gpu_seconds", 1.5, tenant="acme", id=new_event_id())  # type: ignore[arg-type]
    from services.billing.client import usage_event

    with pytest.raises(InvalidArgument, match="source"):
        emitter.emit_events([usage_event(source="training", id="x", tenant="acme", meter="gpu_seconds", quantity=1)])
    assert emitter.pending() == 0
    await emitter.close()
