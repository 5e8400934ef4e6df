"""SIGKILL the billing service (its own OS process) in the middle of ingest while an emitter keeps sending, and
crash the emitter too: after both restart, the totals are exactly what was emitted. Nothing lost, nothing
doubled.

The kill is aimed at the worst moment: a batch committed by billing whose answer has not reached the emitter
(a proxy holds billing's answers back until the ledger shows the commit), so the emitter must resend it and
billing must recognise it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from fractions import Fraction
from pathlib import Path
from typing import cast

import grpc
import pytest
from sqlalchemy import create_engine, func, select

from services.auth.client import AuthClient
from services.billing.client import BillingClient, UsageEmitter
from services.billing.config import BillingSettings
from services.billing.schema import usage_events
from services.cli.session import BearerToken
from services.gen.aidc.billing.v1 import billing_service_pb2 as pb
from services.mesh.channels import create_channel
from tests.billing.proxy import HoldingProxy
from tests.conftest import AuthProcess, free_port, service_env, start_service_process, stop_process, wait_serving

pytestmark = pytest.mark.slow

TOTAL = 6000
HOUR = 3600 * 10**9


def _quantity(i: int) -> str:
    return f"{i % 7}.{i % 1000:03d}"


async def test_sigkill_mid_ingest_loses_and_doubles_nothing(auth_process: AuthProcess, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = service_env(
        tmp_path / "billing-data",
        AIDC_AUTH_ADDR=auth_process.address,
        AIDC_BILLING_ADDR=address,
        AIDC_LOG_LEVEL="WARNING",
    )
    settings = BillingSettings.from_env(env)
    log = tmp_path / "billing.log"
    billing = start_service_process("billing", env, log)
    auth = AuthClient(create_channel(auth_process.address, settings))
    token = (await auth.login("platform", "admin", auth_process.admin_password)).access_token
    await auth.close()
    outbox = tmp_path / "serving" / "usage-outbox.db"

    def emitter() -> UsageEmitter:
        bearer = cast(grpc.aio.ClientInterceptor, BearerToken(token))
        client = BillingClient(create_channel(via, settings, extra_interceptors=[bearer]), timeout_seconds=2.0)
        return UsageEmitter(
            outbox,
            client,
            source="serving",
            batch_size=250,
            flush_interval_seconds=0.02,
            initial_backoff_seconds=0.05,
            max_backoff_seconds=0.5,
        )

    proxy = HoldingProxy(address)
    via = await proxy.start()
    engine = create_engine(settings.database_url_for("billing"))

    def recorded() -> int:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(usage_events)).scalar_one())

    start = time.time_ns()
    current = emitter()

    async def emit(first: int, last: int) -> None:
        for i in range(first, last):
            current.emit("inference_requests", _quantity(i), tenant="acme", id=f"req-{i}", time_ns=start + i)
            if i % 25 == 24:
                await asyncio.sleep(0.01)  # a steady stream, as a gateway would produce

    try:
        await asyncio.to_thread(wait_serving, address, 30, billing)
        await current.start()
        # 1. Billing is ingesting a steady stream. Hold its answers back until it has committed a batch the
        # emitter has not heard about, then kill it -9.
        producer = asyncio.create_task(emit(0, 2000))
        while current.stats.accepted < 800:
            await asyncio.sleep(0.01)
        proxy.hold_answers()
        # An answer that passed the proxy just before the hold may still be on its way into the emitter: the
        # emitter's own count, read live, is what it has heard.
        deadline = time.monotonic() + 20
        while await asyncio.to_thread(recorded) <= current.stats.accepted:
            assert time.monotonic() < deadline, "billing never committed while its answers were held"
            await asyncio.sleep(0.005)
        billing.send_signal(signal.SIGKILL)
        billing.wait()
        proxy.release()
        await producer
        # Billing is dead and its connections dropped: no answer can reach the emitter any more.
        committed_unacknowledged = await asyncio.to_thread(recorded) - current.stats.accepted
        assert current.pending() > 0 and committed_unacknowledged > 0
        # 2. The outage: the emitter keeps metering; then the emitting process crashes too (its sender vanishes
        # mid-retry, only the outbox file remains) and a new one starts on the same outbox.
        await emit(2000, 3000)
        assert current._task is not None
        current._task.cancel()
        await asyncio.gather(current._task, return_exceptions=True)
        await current.client.close()
        current = emitter()
        await current.start()
        await emit(3000, 4000)
        # 3. Billing restarts on the same data; usage keeps coming.
        billing = start_service_process("billing", env, log)
        await emit(4000, TOTAL)
        await asyncio.to_thread(wait_serving, address, 30, billing)
        await current.flush(timeout=30)
        assert current.pending() == 0 and current.dead_letters() == []
        # The batch committed before the kill came back as duplicates, not as new usage.
        assert current.stats.duplicates == committed_unacknowledged

        client = current.client
        expected_sum = sum(Fraction(_quantity(i)) for i in range(TOTAL))
        sums = await client.query_usage("inference_requests", tenant="acme", aggregation=pb.AGGREGATION_SUM)
        counts = await client.query_usage("inference_requests", tenant="acme", aggregation=pb.AGGREGATION_COUNT)
        assert Fraction(sums.buckets[0].value) == expected_sum
        assert counts.buckets[0].value == str(TOTAL)
        # The ledger itself holds each event exactly once.
        with engine.connect() as conn:
            rows = conn.execute(select(func.count(), func.count(func.distinct(usage_events.c.event_id)))).one()
        assert tuple(rows) == (TOTAL, TOTAL)
    finally:
        await current.close(flush_timeout=0.1)
        await proxy.close()
        engine.dispose()
        stop_process(billing)
