"""The training service through its real gRPC server, with real auth, a real storage service on a real SeaweedFS
and the real scheduler running real runner processes: fine-tune a tiny BERT end to end through the scheduler, reject
bad specs and refused runs before anything runs, keep tenants apart, cancel from either side, follow a preemption,
and survive a restart of the training service while the scheduler runs the job."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest

from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from services.gen.aidc.storage.v1 import storage_service_pb2 as storage_pb
from services.gen.aidc.training.v1 import training_service_pb2 as pb
from services.mesh.db import open_database
from services.mesh.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from services.mesh.identity import TOKEN_LEEWAY_SECONDS
from services.mesh.sealing import WrongMasterKey, unseal
from services.scheduler.client import resources
from services.storage.client import StorageClient
from services.training.client import TrainingClient
from services.training.config import TrainingSettings
from services.training.core.model import ComputeSpec
from services.training.core.service import JOB_LABEL, JobOptions, TrainingCore, resolve_compute
from services.training.runner.sealed import KEY_ENV, job_data_key
from services.training.runner.tiny import keyword_dataset
from services.training.store import TrainingStore
from tests.at_rest import stored_in_clear
from tests.conftest import RunningAuth
from tests.scheduler.service_support import GIB, RunningScheduler, runner_command, set_quota, wait_terminal
from tests.storage import conftest as storage_conftest
from tests.storage.conftest import RunningStorage
from tests.training.conftest import (
    RunningTraining,
    keyword_spec,
    start_training,
    training_settings,
    upload_keywords_and_tiny_bert,
    wait_for_job,
)

TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


async def _setup(storage: RunningStorage, training: RunningTraining, tiny_bert_dir: Path) -> StorageClient:
    """acme/dev uploads the keyword dataset and the tiny BERT, and registers it as base model tiny-bert."""
    files = storage.client("acme/dev")
    base = await upload_keywords_and_tiny_bert(files, training.client(), tiny_bert_dir)
    assert base.source == pb.BASE_MODEL_SOURCE_TENANT and base.max_seq_length == 64 and base.parameter_count > 0
    return files


async def _watch(client: TrainingClient, job_id: str, after: int = 0) -> list[pb.JobEvent]:
    return [event async for event in client.watch_job(job_id, tenant="acme", after_sequence=after, include_logs=True)]


def _states(events: list[pb.JobEvent]) -> list[int]:
    return [e.state_change.to_state for e in events if e.HasField("state_change")]


async def _progress_reaches(client: TrainingClient, job_id: str, step: int) -> int:
    async for event in client.watch_job(job_id, tenant="acme"):
        if event.HasField("progress") and event.progress.step >= step:
            return event.progress.step
    raise AssertionError(f"job {job_id} ended before step {step}")


async def test_fine_tune_end_to_end(storage: RunningStorage, training: RunningTraining, tiny_bert_dir: Path) -> None:
    files = await _setup(storage, training, tiny_bert_dir)
    client = training.client()
    # A short deadline on the submit call: the job outlives it and must not inherit it (its scheduler and storage
    # calls would fail DEADLINE_EXCEEDED).
    job = await client.submit_fine_tune(keyword_spec(), tenant="acme", request_id="first", timeout=5.0)
    assert job.state == pb.JOB_STATE_QUEUED and job.spec.dataset.version == 1 and job.scheduler_job_id
    # The job's copy of the dataset (there once the submission returns) is sealed under the job's key: no file of
    # the job's directory holds the tenant's data in the clear.
    job_dir = training.settings.jobs_dir / job.job_id
    assert [p.name for p in job_dir.glob("dataset*")] == ["dataset.csv.sealed"]
    rows = [text.encode() for text, _ in keyword_dataset(600, seed=1)[:20]]
    assert not stored_in_clear(job_dir, rows)
    again = await client.submit_fine_tune(keyword_spec(), tenant="acme", request_id="first")
    assert again.job_id == job.job_id  # idempotent on request_id

    events = await _watch(client, job.job_id)
    states = _states(events)
    assert states[0] == pb.JOB_STATE_QUEUED and states[-1] == pb.JOB_STATE_SUCCEEDED, states
    assert pb.JOB_STATE_RUNNING in states and pb.JOB_STATE_EXPORTING in states
    assert any(e.HasField("progress") and e.progress.step > 0 for e in events)
    assert [e.metrics.epoch for e in events if e.HasField("metrics")] == [0, 1, 2]  # one evaluation per epoch
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    # The scheduler's path of the run is in the history: queued, admitted on the node, running, succeeded.
    path = [scheduler_pb.JobState.Name(e.scheduling.state) for e in events if e.HasField("scheduling")]
    assert path[0] == "JOB_STATE_QUEUED" and path[-1] == "JOB_STATE_SUCCEEDED", path
    assert {"JOB_STATE_SCHEDULED", "JOB_STATE_RUNNING"} <= set(path), path
    assert path.index("JOB_STATE_SCHEDULED") < path.index("JOB_STATE_RUNNING"), path  # even when admitted unseen
    assert all(e.scheduling.scheduler_job_id == job.scheduler_job_id for e in events if e.HasField("scheduling"))
    # Replaying from a sequence gives exactly the rest.
    assert [e.sequence for e in await _watch(client, job.job_id, after=3)] == [e.sequence for e in events[3:]]

    done = await client.get_job(job.job_id, tenant="acme")
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.attempt == 1
    assert done.scheduler_state == scheduler_pb.JOB_STATE_SUCCEEDED and done.preemptions == 0
    assert (done.model, done.model_version) == ("keywords-clf", 1)
    assert done.progress.step == done.progress.total_steps > 0
    # The defaults it asked the scheduler for.
    assert (done.spec.compute.cpu_millicores, done.spec.compute.memory_bytes) == (1000, 2 * GIB)

    # The scheduler ran it as the submitter's job, in the submitter's tenant, in the job's directory.
    [run] = await training.scheduled(job.job_id)
    assert run.job_id == job.scheduler_job_id and run.state == scheduler_pb.JOB_STATE_SUCCEEDED
    assert (run.tenant, run.submitted_by, run.labels[JOB_LABEL]) == ("acme", "user:acme/dev", job.job_id)
    assert (run.resources.cpu_millicores, run.resources.memory_bytes, run.attempt) == (1000, 2 * GIB, 1)
    assert run.executor.working_dir == str(training.settings.jobs_dir / job.job_id)
    assert run.executor.command[1:3] == ["-m", "services.training.runner"]
    # The run gets the job's key as a secret (kept sealed by the scheduler, never shown), and it is nowhere at rest.
    assert KEY_ENV in run.executor.secret_env and not run.executor.secret_env[KEY_ENV]
    assert KEY_ENV not in run.executor.env
    assert not stored_in_clear(
        training.settings.training_dir, [job_data_key(training.settings.master_key(), job.job_id)]
    )
    # Tenants do not see each other's runs in the scheduler either.
    assert (await training.scheduler.client("globex/dev").list_jobs())[0] == []

    version = await client.get_model_version("keywords-clf", tenant="acme")
    dataset = await files.stat("acme", "keywords")
    assert version.lineage.dataset_sha256 == dataset.sha256
    assert version.lineage.dataset.name == "keywords" and version.lineage.dataset.version == 1
    assert version.lineage.base_model == "tiny-bert" and len(version.lineage.base_model_sha256) == 64
    assert version.lineage.job_id == job.job_id and version.lineage.code_version.startswith("aidc")
    assert version.lineage.spec.hyperparameters.learning_rate == pytest.approx(3e-3)
    assert "torch" in version.lineage.library_versions
    assert version.metrics.values["accuracy"] > 0.6  # chance is 1/3
    assert list(version.labels) == ["negative", "neutral", "positive"]
    assert version.export_parity.passed and version.export_parity.max_abs_logit_diff <= version.export_parity.tolerance
    roles = {a.role: a for a in version.artifacts}
    assert set(roles) == {"model", "model_config", "labels", "tokenizer", "tensorboard"}
    assert version.total_size_bytes == sum(a.size_bytes for a in version.artifacts)
    for artifact in version.artifacts:  # every export artifact is in storage, byte for byte what was registered
        stored = await files.stat("acme", artifact.name, kind=storage_pb.OBJECT_KIND_ARTIFACT, version=artifact.version)
        assert (stored.sha256, stored.size_bytes) == (artifact.sha256, artifact.size_bytes)
    # The ended job left nothing of the tenant's in its directory (the dataset's copy, checkpoints, the export now in
    # storage): only the scheduler's files of its attempt, the runner's output.
    assert [p.name for p in job_dir.iterdir()] == [job.scheduler_job_id]
    assert not stored_in_clear(job_dir, rows)
    # Training meters nothing itself any more: the scheduler meters the run's allocation (tests/training/
    # test_through_the_mesh.py follows it into billing).
    assert not (training.settings.data_dir / "training" / "usage-outbox.db").exists()

    model = await client.set_alias("keywords-clf", "production", 1, tenant="acme")
    assert dict(model.aliases) == {"production": 1}
    assert (await client.get_model_version("keywords-clf", tenant="acme", alias="production")).aliases == ["production"]
    assert [m.name for m in await client.list_models(tenant="acme")] == ["keywords-clf"]
    assert [j.job_id for j in (await client.list_jobs(tenant="acme"))[0]] == [job.job_id]

    # Another tenant sees none of it.
    other = training.client("globex/dev")
    with pytest.raises(NotFound):
        await other.get_job(job.job_id, tenant="globex")
    with pytest.raises(NotFound):
        await other.get_model_version("keywords-clf", tenant="globex")
    assert (await other.list_jobs(tenant="globex"))[0] == []
    with pytest.raises(PermissionDenied):
        await other.get_job(job.job_id, tenant="acme")
    assert "tiny-bert" not in {b.name for b in await other.list_base_models(tenant="globex")}


def _bad(spec: pb.FineTuneSpec, change: dict[str, object]) -> pb.FineTuneSpec:
    ((key, value),) = change.items()
    if key == "dataset":
        spec.dataset.name = str(value)
    elif key == "base_model":
        spec.base_model = str(value)
    elif key == "label_column":
        spec.sequence_classification.label_column = str(value)
    elif key in ("learning_rate", "max_seq_length"):
        setattr(spec.hyperparameters, key, value)
    else:
        setattr(spec.compute, key, value)
    return spec


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"dataset": "nope"}, InvalidArgument, "unknown dataset"),
        ({"base_model": "no-such-model"}, InvalidArgument, "unknown base model"),
        ({"label_column": "category"}, InvalidArgument, "category"),
        ({"learning_rate": 0.0}, InvalidArgument, "learning_rate must be > 0"),
        ({"learning_rate": -1.0}, InvalidArgument, "learning_rate must be > 0"),
        ({"max_seq_length": 128}, InvalidArgument, "above the base model's maximum of 64"),
        ({"cpu_millicores": -5}, InvalidArgument, "must not be negative"),
        # Refused by the scheduler itself: the submission is undone.
        ({"pool": "no-such-pool"}, InvalidArgument, "unknown pool"),
        ({"cpu_millicores": 64_000}, InvalidArgument, "no node"),
        ({"priority": 900}, PermissionDenied, "priorities above 500"),
    ],
)
async def test_bad_specs_and_refused_runs_are_rejected_before_anything_runs(
    storage: RunningStorage,
    training: RunningTraining,
    tiny_bert_dir: Path,
    change: dict[str, object],
    error: type[Exception],
    message: str,
) -> None:
    await _setup(storage, training, tiny_bert_dir)
    with pytest.raises(error, match=message):
        await training.client().submit_fine_tune(_bad(keyword_spec(), change), tenant="acme")
    assert await training.scheduled() == []
    assert (await training.client().list_jobs(tenant="acme"))[0] == []
    assert not any(training.settings.jobs_dir.iterdir()) if training.settings.jobs_dir.exists() else True


async def test_a_job_waits_queued_with_the_schedulers_reason_and_cancels_from_training(
    storage: RunningStorage, training: RunningTraining, tiny_bert_dir: Path
) -> None:
    await _setup(storage, training, tiny_bert_dir)
    client = training.client()
    admin = training.scheduler.client("platform/admin")
    await set_quota(admin, "acme", 500)  # less than the job's one core
    job = await client.submit_fine_tune(keyword_spec(), tenant="acme")
    waiting = await wait_for_job(client, job.job_id, lambda j: "quota" in j.scheduler_reason, what="its reason")
    assert waiting.state == pb.JOB_STATE_QUEUED and waiting.scheduler_state == scheduler_pb.JOB_STATE_QUEUED
    assert waiting.queue_position == 0

    cancelled = await client.cancel_job(job.job_id, tenant="acme", reason="changed my mind")
    assert cancelled.state == pb.JOB_STATE_CANCELLING
    events = await _watch(client, job.job_id)
    assert _states(events)[-1] == pb.JOB_STATE_CANCELLED
    waited = [e.scheduling for e in events if e.HasField("scheduling") and "quota" in e.scheduling.reason]
    assert waited and waited[0].state == scheduler_pb.JOB_STATE_QUEUED  # WatchJob showed why it waited
    final = await client.get_job(job.job_id, tenant="acme")
    assert final.state == pb.JOB_STATE_CANCELLED and "changed my mind" in final.error and final.attempt == 1
    [run] = await training.scheduled(job.job_id)
    assert run.state == scheduler_pb.JOB_STATE_CANCELLED and "changed my mind" in run.state_reason
    assert not (training.settings.jobs_dir / job.job_id / job.scheduler_job_id / "attempt-1").exists()  # never ran
    assert not list((training.settings.jobs_dir / job.job_id).glob("dataset*"))  # nor is its dataset's copy kept

    # A service stopped between recording a job's end and clearing its directory: the next leader clears it.
    # The end is recorded before the directory is cleared: wait for that clear (it removes the job's spec), so
    # that what is planted next can only be cleared by the restarted leader.
    job_dir = training.settings.jobs_dir / job.job_id
    deadline = time.monotonic() + 30
    while (job_dir / "spec.json").exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    kept = sorted(p.name for p in job_dir.iterdir())
    assert "spec.json" not in kept
    (job_dir / "dataset.csv.sealed").write_bytes(b"sealed rows")
    (job_dir / "run" / "checkpoints").mkdir(parents=True)
    (job_dir / "run" / "checkpoints" / "step-1.pt").write_bytes(b"weights")
    await training.stop()
    restarted = await start_training(training.settings, training.tokens, training.scheduler)
    try:
        deadline = time.monotonic() + 30
        while sorted(p.name for p in job_dir.iterdir()) != kept and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert sorted(p.name for p in job_dir.iterdir()) == kept
    finally:
        await restarted.stop()


async def test_a_jobs_delegation_is_kept_only_sealed_and_another_master_key_is_refused(
    storage: RunningStorage, training: RunningTraining, tiny_bert_dir: Path
) -> None:
    """A job waiting for quota holds its submitter's delegation: training's files hold it only sealed, and training
    given another master key refuses to start, naming it (it used to start, and fail every job it followed as "the
    scheduler refused the job's run", unable to cancel their runs or revoke their delegations)."""
    await _setup(storage, training, tiny_bert_dir)
    await set_quota(training.scheduler.client("platform/admin"), "acme", 500)  # less than the job's one core
    job = await training.client().submit_fine_tune(keyword_spec(), tenant="acme")
    await training.stop()
    db = open_database(training.settings.database_url_for("training"))
    try:
        sealed = TrainingStore(db).job_credential(job.job_id)
    finally:
        db.dispose()
    assert sealed is not None
    delegation = unseal(training.settings.master_key(), sealed, job.job_id.encode())  # dg_<id>.<secret>
    assert delegation.startswith(b"dg_")
    assert not stored_in_clear(training.settings.training_dir, [delegation.split(b".", 1)[1]])

    wrong = replace(training.settings, training_master_key=base64.b64encode(secrets.token_bytes(32)).decode())
    with pytest.raises(WrongMasterKey, match=f"job {job.job_id} does not open with this master key"):
        await start_training(wrong, training.tokens, training.scheduler)
    restarted = await start_training(training.settings, training.tokens, training.scheduler)  # the right key does
    try:
        cancelled = await restarted.client().cancel_job(job.job_id, tenant="acme", reason="done")
        assert cancelled.state == pb.JOB_STATE_CANCELLING
        assert _states(await _watch(restarted.client(), job.job_id))[-1] == pb.JOB_STATE_CANCELLED  # as its submitter
    finally:
        await restarted.stop()


@pytest.mark.slow
async def test_cancel_from_either_side_reaches_the_runner(
    storage: RunningStorage, training: RunningTraining, tiny_bert_dir: Path
) -> None:
    await _setup(storage, training, tiny_bert_dir)
    client = training.client()
    for side in ("training", "scheduler"):
        job = await client.submit_fine_tune(keyword_spec(epochs=30), tenant="acme")
        await _progress_reaches(client, job.job_id, 2)
        if side == "training":
            await client.cancel_job(job.job_id, tenant="acme", reason="from training")
        else:  # `aidc jobs cancel` on the tenant's own path
            await training.scheduler.client("acme/dev").cancel_job(job.scheduler_job_id, reason="from scheduler")
        events = await _watch(client, job.job_id)
        assert _states(events)[-2:] == [pb.JOB_STATE_CANCELLING, pb.JOB_STATE_CANCELLED], _states(events)
        final = await client.get_job(job.job_id, tenant="acme")
        assert final.state == pb.JOB_STATE_CANCELLED and f"from {side}" in final.error, final.error
        # The runner got SIGTERM, checkpointed and said so before it exited 130.
        logs = [e.log.message for e in events if e.HasField("log")]
        assert "runner: cancelled" in logs and any("cancelled at step" in m for m in logs), logs
        [run] = await training.scheduled(job.job_id)
        assert run.state == scheduler_pb.JOB_STATE_CANCELLED and run.exit_code == 130


async def test_a_job_failing_in_the_service_stops_its_run(
    storage: RunningStorage, training: RunningTraining, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault of the service while the scheduler runs the job ends the job FAILED; its runner must not go on
    spending the tenant's quota for it (nor write into the job's directory, cleared once the job ended)."""
    await _setup(storage, training, tiny_bert_dir)
    client = training.client()
    track = TrainingCore._track

    async def broken_once_running(self: TrainingCore, job: Any, run: Any) -> None:
        if run.state == "running":
            raise RuntimeError("a fault of the service")
        await track(self, job, run)

    monkeypatch.setattr(TrainingCore, "_track", broken_once_running)
    job = await client.submit_fine_tune(keyword_spec(epochs=30), tenant="acme")
    final = await wait_for_job(client, job.job_id, lambda j: j.state in TERMINAL, what="the job's end")
    monkeypatch.setattr(TrainingCore, "_track", track)
    assert final.state == pb.JOB_STATE_FAILED and final.error == "internal error: RuntimeError", final.error
    [run] = await training.scheduled(job.job_id)
    run = await wait_terminal(training.scheduler.client("platform/admin"), run.job_id, tenant="acme")
    assert run.state == scheduler_pb.JOB_STATE_CANCELLED and "internal error" in run.state_reason, run


async def test_a_relay_that_fails_once_mid_run_goes_on_relaying(
    storage: RunningStorage, training: RunningTraining, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault while relaying the runner's output (e.g. the database briefly away) must not leave the job without
    progress for the rest of its run."""
    await _setup(storage, training, tiny_bert_dir)
    client = training.client()
    relay = TrainingCore._relay
    faults: list[int] = []

    async def fails_once_after_the_first_progress(self: TrainingCore, job: Any, *, final: bool) -> None:
        if not final and not faults and job.progress:
            faults.append(job.progress["step"])
            raise OSError("a fault while relaying")
        await relay(self, job, final=final)

    monkeypatch.setattr(TrainingCore, "_relay", fails_once_after_the_first_progress)
    job = await client.submit_fine_tune(keyword_spec(epochs=30), tenant="acme")
    await wait_for_job(client, job.job_id, lambda j: bool(faults), what="the fault")
    step = await _progress_reaches(client, job.job_id, faults[0] + 1)
    running = await client.get_job(job.job_id, tenant="acme")
    assert running.state == pb.JOB_STATE_RUNNING, (faults, step, running.state)
    await client.cancel_job(job.job_id, tenant="acme", reason="seen enough")
    await _watch(client, job.job_id)


@pytest.mark.slow
async def test_a_preempted_fine_tune_resumes_from_its_checkpoint_and_registers_one_version(
    storage: RunningStorage, training: RunningTraining, tiny_bert_dir: Path
) -> None:
    await _setup(storage, training, tiny_bert_dir)
    client = training.client()
    spec = keyword_spec(epochs=4)
    spec.compute.cpu_millicores, spec.compute.preemptible = 3000, True
    job = await client.submit_fine_tune(spec, tenant="acme")
    before = await _progress_reaches(client, job.job_id, 5)
    # Higher-priority work of the tenant needs the node (4 cores): the fine-tune gets SIGTERM, checkpoints and is
    # requeued.
    admin = training.scheduler.client("platform/admin")
    urgent = (
        await admin.submit_job(runner_command(10, 0.1), tenant="acme", resources=resources(2000, GIB), priority=100)
    ).job
    assert (await wait_terminal(admin, urgent.job_id, timeout=120)).state == scheduler_pb.JOB_STATE_SUCCEEDED

    events = await _watch(client, job.job_id)
    final = await client.get_job(job.job_id, tenant="acme")
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert (final.attempt, final.preemptions) == (2, 1)
    # The preemption shows: preempted in the scheduler, back to QUEUED, RUNNING again in attempt 2.
    scheduling = [e.scheduling for e in events if e.HasField("scheduling")]
    preempted = next(s for s in scheduling if s.state == scheduler_pb.JOB_STATE_PREEMPTED)
    assert urgent.job_id in preempted.reason, preempted
    states = _states(events)
    assert states[:4] == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING]
    second = next(i for i, e in enumerate(events) if "attempt 2" in e.state_change.message)
    # It resumed from the checkpoint written on SIGTERM: the step counter continues, no step is trained twice.
    checkpoint = max(e.checkpoint.step for e in events[:second] if e.HasField("checkpoint"))
    resumed = [e.progress.step for e in events[second:] if e.HasField("progress")]
    assert checkpoint >= before and min(resumed) > checkpoint, (before, checkpoint, resumed)
    versions = await client.list_model_versions("keywords-clf", tenant="acme")
    assert [(v.version, v.lineage.job_id) for v in versions] == [(1, job.job_id)]
    [run] = await training.scheduled(job.job_id)
    assert (run.state, run.attempt, run.preemptions) == (scheduler_pb.JOB_STATE_SUCCEEDED, 2, 1)


@pytest.mark.slow
async def test_a_training_restart_while_the_scheduler_runs_the_job_ends_it_exactly_once(
    storage: RunningStorage, training: RunningTraining, tiny_bert_dir: Path
) -> None:
    await _setup(storage, training, tiny_bert_dir)
    client = training.client()
    job = await client.submit_fine_tune(keyword_spec(epochs=4), tenant="acme")
    before = await _progress_reaches(client, job.job_id, 5)
    seen = await _watch(client, job.job_id)  # everything relayed so far ... (the job is still running)
    await training.stop()
    restarted = await start_training(training.settings, training.tokens, training.scheduler)
    try:
        client = restarted.client()
        events = await _watch(client, job.job_id)
        final = await client.get_job(job.job_id, tenant="acme")
        assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
        # The run went on in the scheduler while the service was down: never relaunched.
        [run] = await restarted.scheduled(job.job_id)
        assert (run.attempt, run.state, final.attempt) == (1, scheduler_pb.JOB_STATE_SUCCEEDED, 1)
        assert _states(events).count(pb.JOB_STATE_RUNNING) == 1
        # The history continued where it stopped: no event twice, none lost (every step's progress in order).
        assert [e.sequence for e in events[: len(seen)]] == [e.sequence for e in seen]
        steps = [e.progress.step for e in events if e.HasField("progress")]
        assert steps == sorted(set(steps)) and before in steps, steps
        assert [e.metrics.epoch for e in events if e.HasField("metrics")] == [0, 1, 2, 3]
        assert _states(events).count(pb.JOB_STATE_SUCCEEDED) == 1
        # The restarted service has no token of the submitter: the job acts for it through the delegation stored
        # (sealed) with the job, and publishes exactly one version.
        versions = await client.list_model_versions("keywords-clf", tenant="acme")
        assert [(v.version, v.lineage.job_id) for v in versions] == [(1, job.job_id)]
        assert (final.model, final.model_version) == ("keywords-clf", 1)
    finally:
        await restarted.stop()


@pytest.mark.slow
@pytest.mark.auth_env(AIDC_AUTH_ACCESS_TOKEN_TTL_SECONDS="25")
async def test_a_job_outliving_the_submitters_token_publishes_for_the_submitter(
    auth: RunningAuth, storage: RunningStorage, scheduler: RunningScheduler, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    token = storage.tokens["acme/dev"]
    expires = jwt.decode(token, options={"verify_signature": False})["exp"]
    settings = training_settings(tmp_path / "training", auth, storage.address, scheduler.address)
    training = await start_training(settings, storage.tokens, scheduler)
    admin = scheduler.client("platform/admin")
    try:
        await _setup(storage, training, tiny_bert_dir)
        await set_quota(admin, "acme", 0)  # it waits in the queue ...
        job = await training.client().submit_fine_tune(keyword_spec(epochs=2), tenant="acme")
        waiting = await wait_for_job(training.client(), job.job_id, lambda j: "quota" in j.scheduler_reason, what="why")
        assert waiting.state == pb.JOB_STATE_QUEUED
        # ... until the submitter's token is refused everywhere (its expiry plus the verifiers' leeway).
        await asyncio.sleep(max(0.0, expires + TOKEN_LEEWAY_SECONDS + 1 - time.time()))
        with pytest.raises(Unauthenticated):
            await storage.client("acme/dev").stat("acme", "keywords")  # the submitter's token is long dead
        for user, (tenant, name, password) in {
            "acme/dev": ("acme", "dev", storage_conftest.PASSWORD),
            "platform/admin": ("platform", "admin", auth.admin_password),
        }.items():
            storage.tokens[user] = (await auth.client().login(tenant, name, password)).access_token
        await set_quota(scheduler.client("platform/admin"), "acme", 4000)

        client = training.client()
        final = await wait_for_job(client, job.job_id, lambda j: j.state in TERMINAL, what="to its end")
        assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
        versions = await client.list_model_versions("keywords-clf", tenant="acme")
        assert [(v.version, v.lineage.job_id) for v in versions] == [(1, job.job_id)]
        # Followed and published for the submitter (not as the training service), and the delegation ended with
        # the job.
        files = storage.client("acme/dev")
        for artifact in versions[0].artifacts:
            stat = await files.stat(
                "acme", artifact.name, kind=storage_pb.OBJECT_KIND_ARTIFACT, version=artifact.version
            )
            assert stat.created_by == "user:acme/dev"
        [run] = await training.scheduled(job.job_id)
        assert run.submitted_by == "user:acme/dev"
        admin_auth = auth.client((await auth.client().login("platform", "admin", auth.admin_password)).access_token)
        events = [(e.action, e.target) for e in await admin_auth.list_audit_events("acme", 200)]
        delegations = [t for a, t in events if a == "delegation.create"]
        assert len(delegations) == 1 and ("delegation.revoke", delegations[0]) in events
    finally:
        await training.stop()


async def test_base_model_registration_errors(
    storage: RunningStorage, training: RunningTraining, tiny_bert_dir: Path
) -> None:
    files = await _setup(storage, training, tiny_bert_dir)  # registers tiny-bert
    client = training.client()
    with pytest.raises(AlreadyExists):
        await client.register_base_model("tiny-bert", "bases/tiny-bert.tar.gz", tenant="acme")
    with pytest.raises(InvalidArgument, match="built-in"):
        await client.register_base_model("minilm-l6", "bases/tiny-bert.tar.gz", tenant="acme")
    await files.upload("acme", "bases/junk.tar", b"not a tar", kind=storage_pb.OBJECT_KIND_ARTIFACT)
    with pytest.raises(InvalidArgument, match="not a usable base model"):
        await client.register_base_model("junk", "bases/junk.tar", tenant="acme")
    with pytest.raises(NotFound):
        await client.register_base_model("missing", "bases/missing.tar", tenant="acme")
    names = {b.name: b.source for b in await client.list_base_models(tenant="acme")}
    assert names == {"minilm-l6": pb.BASE_MODEL_SOURCE_BUILTIN, "tiny-bert": pb.BASE_MODEL_SOURCE_TENANT}
    with pytest.raises(NotFound):
        await client.get_model_version("nothing", tenant="acme")
    with pytest.raises(NotFound):
        await client.set_alias("nothing", "production", 1, tenant="acme")


def test_a_fine_tune_asking_less_memory_than_the_runner_needs_is_refused() -> None:
    options = JobOptions(jobs_dir=Path("jobs"))
    with pytest.raises(InvalidArgument, match="at least 512 MiB"):
        resolve_compute(ComputeSpec(memory_bytes=256 * 2**20), options)
    assert resolve_compute(ComputeSpec(memory_bytes=512 * 2**20), options).memory_bytes == 512 * 2**20
    assert resolve_compute(ComputeSpec(), options).memory_bytes == options.default_memory_bytes


def test_a_fine_tune_naming_no_pool_runs_in_the_services_default_pool() -> None:
    """A cluster sends fine-tunes to its Ray pool (AIDC_TRAINING_DEFAULT_POOL); a spec's own pool wins."""
    options = JobOptions(jobs_dir=Path("jobs"), default_pool="ray")
    assert resolve_compute(ComputeSpec(), options).pool == "ray"
    assert resolve_compute(ComputeSpec(pool="default"), options).pool == "default"
    assert resolve_compute(ComputeSpec(), JobOptions(jobs_dir=Path("jobs"))).pool == ""
    assert TrainingSettings.from_env({"AIDC_TRAINING_DEFAULT_POOL": "ray"}).training_default_pool == "ray"
    with pytest.raises(ValueError, match="AIDC_TRAINING_DEFAULT_POOL"):
        TrainingSettings.from_env({"AIDC_TRAINING_DEFAULT_POOL": "Ray Pool"}).validate()
