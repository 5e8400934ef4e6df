"""A fine-tune through the whole mesh on mutual TLS, billing included: what tenants pay for a fine-tune is the
scheduler's meter of the allocation its run held (cpu_core_seconds and memory_gib_seconds of the scheduler's job,
delivered to the real billing service), and nothing the training service meters itself; and the runner's own spans
(data load, each epoch, evaluation, export) are children in the trace of the SubmitFineTune that started it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry import trace

from services.gen.aidc.training.v1 import training_service_pb2 as pb
from services.mesh.spanstore import SpanRecord, SpanStore
from services.mesh.telemetry import init_telemetry, shutdown_telemetry
from services.scheduler.config import SchedulerSettings
from tests.billing.conftest import RunningBilling, start_billing
from tests.conftest import RunningAuth
from tests.scheduler.service_support import RunningScheduler, scheduler_env, start_scheduler
from tests.scheduler.test_service_billing import assert_billed_as_held, billed, held_seconds
from tests.storage.conftest import RunningStorage
from tests.training.conftest import (
    RunningTraining,
    keyword_spec,
    start_training,
    training_settings,
    upload_keywords_and_tiny_bert,
)

pytestmark = pytest.mark.slow

RUNNER = "training-runner"


@dataclass
class Mesh:
    billing: RunningBilling
    scheduler: RunningScheduler
    training: RunningTraining


@pytest.fixture
def span_store(tmp_path: Path) -> Iterator[SpanStore]:
    """Tracing for this process (the services run in it) into a span store of its own."""
    init_telemetry("mesh-test", tmp_path / "telemetry")
    yield SpanStore(tmp_path / "telemetry" / "traces")
    shutdown_telemetry()


@pytest.fixture
async def mesh(
    auth: RunningAuth, storage: RunningStorage, span_store: SpanStore, tmp_path: Path
) -> AsyncIterator[Mesh]:
    billing = await start_billing(auth, tmp_path / "billing-data", AIDC_CERTS_DIR=auth.settings.certs_dir)
    env = scheduler_env(
        tmp_path / "scheduler-data",
        auth.address,
        AIDC_CERTS_DIR=auth.settings.certs_dir,
        AIDC_BILLING_ADDR=billing.address,
        AIDC_SCHEDULER_METERING_INTERVAL_SECONDS="1",
    )
    scheduler = await start_scheduler(SchedulerSettings.from_env(env), storage.tokens)
    settings = training_settings(tmp_path / "training", auth, storage.address, scheduler.address)
    training = await start_training(settings, storage.tokens, scheduler)
    try:
        yield Mesh(billing, scheduler, training)
    finally:
        await training.stop()
        await scheduler.stop()
        await billing.server.stop(0)


def _children(spans: list[SpanRecord], parent: SpanRecord) -> list[SpanRecord]:
    return [s for s in spans if s.parent_span_id == parent.span_id]


async def test_a_fine_tune_is_billed_by_the_scheduler_and_traced_into_its_runner(
    mesh: Mesh, storage: RunningStorage, tiny_bert_dir: Path, span_store: SpanStore
) -> None:
    training = mesh.training
    await upload_keywords_and_tiny_bert(storage.client("acme/dev"), training.client(), tiny_bert_dir)
    client = training.client()
    with trace.get_tracer(__name__).start_as_current_span("test: submit a fine-tune"):
        job = await client.submit_fine_tune(keyword_spec(epochs=2), tenant="acme")
    async for event in client.watch_job(job.job_id, tenant="acme"):
        if event.HasField("state_change") and event.state_change.to_state == pb.JOB_STATE_SUCCEEDED:
            break
    done = await client.get_job(job.job_id, tenant="acme")
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error

    # Billing: the allocation the scheduler's job held, exactly once, and nothing for the training job itself.
    billing = mesh.billing
    held = held_seconds(mesh.scheduler.settings)
    assert set(held) == {done.scheduler_job_id}
    await assert_billed_as_held(billing.client(), "acme", held, mesh.scheduler.settings)
    for meter in ("cpu_core_seconds", "memory_gib_seconds", "gpu_seconds"):
        assert job.job_id not in await billed(billing.client(), "acme", meter)
    assert not (training.settings.data_dir / "training" / "usage-outbox.db").exists()

    # Trace: submit -> training -> scheduler, and the runner's phases under the SubmitFineTune server span.
    spans: list[SpanRecord] = []
    for _ in range(50):  # spans are exported in 200 ms batches; the runner flushes its own as it exits
        spans = span_store.spans(done.trace_id)
        if any(s.service == RUNNER and s.name == "runner: export" for s in spans):
            break
        await asyncio.sleep(0.2)
    [submit] = [s for s in spans if s.name.endswith("TrainingService/SubmitFineTune") and s.kind == "SERVER"]
    assert any(s.name.endswith("SchedulerService/SubmitJob") and s.kind == "SERVER" for s in spans)
    [run] = [s for s in spans if s.service == RUNNER and s.name == "runner: fine-tune"]
    assert run.parent_span_id == submit.span_id
    assert run.attributes["aidc.scheduler.job_id"] == done.scheduler_job_id
    phases = [s.name for s in sorted(_children(spans, run), key=lambda s: s.start_ns)]
    assert phases == ["runner: load data", "runner: load model", "runner: epoch", "runner: epoch", "runner: export"]
    epochs = [s for s in _children(spans, run) if s.name == "runner: epoch"]
    assert [e.attributes["aidc.training.epoch"] for e in epochs] == [0, 1]
    for epoch in epochs:  # each epoch's evaluation is its child
        [evaluation] = [s for s in _children(spans, epoch) if s.name == "runner: evaluate"]
        assert 0 < float(evaluation.attributes["aidc.training.accuracy"]) <= 1
    assert all(s.service == RUNNER for s in spans if s.name.startswith("runner: "))
