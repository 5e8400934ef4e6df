"""The training service through its real gRPC server, with real auth, a real storage service on a real SeaweedFS
and real runner processes: fine-tune a tiny BERT end to end, reject bad specs before launching anything, keep
tenants apart, cancel, and resume a job after the service restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jwt
import pytest

from services.billing.outbox import UsageOutbox
from services.gen.aidc.billing.v1 import billing_service_pb2 as billing_pb
from services.gen.aidc.storage.v1 import storage_service_pb2 as storage_pb
from services.gen.aidc.training.v1 import training_service_pb2 as pb
from services.mesh.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from services.mesh.files import sha256_file
from services.mesh.identity import TOKEN_LEEWAY_SECONDS
from services.storage.client import StorageClient
from services.training.client import TrainingClient
from services.training.core.executor import LocalHandle
from services.training.core.service import RUN_DIR
from tests.conftest import RunningAuth
from tests.storage import conftest as storage_conftest
from tests.storage.conftest import RunningStorage
from tests.training.conftest import (
    CountingExecutor,
    RunningTraining,
    keyword_spec,
    start_training,
    training_settings,
    upload_keywords_and_tiny_bert,
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


async def test_fine_tune_end_to_end(storage: RunningStorage, training: RunningTraining, tiny_bert_dir: Path) -> None:
    files = await _setup(storage, training, tiny_bert_dir)
    client = training.client()
    # A short deadline on the submit call: the job outlives it and must not inherit it (its storage calls would
    # fail DEADLINE_EXCEEDED when it publishes).
    job = await client.submit_fine_tune(keyword_spec(), tenant="acme", request_id="first", timeout=2.0)
    assert job.state == pb.JOB_STATE_QUEUED and job.spec.dataset.version == 1
    again = await client.submit_fine_tune(keyword_spec(), tenant="acme", request_id="first")
    assert again.job_id == job.job_id  # idempotent on request_id

    events = await _watch(client, job.job_id)
    states = [e.state_change.to_state for e in events if e.HasField("state_change")]
    assert states[0] == pb.JOB_STATE_QUEUED and states[-1] == pb.JOB_STATE_SUCCEEDED, states
    assert pb.JOB_STATE_RUNNING in states and pb.JOB_STATE_EXPORTING in states
    assert any(e.HasField("progress") and e.progress.step > 0 for e in events)
    assert [e.metrics.epoch for e in events if e.HasField("metrics")] == [0, 1, 2]  # one evaluation per epoch
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    # Replaying from a sequence gives exactly the rest.
    assert [e.sequence for e in await _watch(client, job.job_id, after=3)] == [e.sequence for e in events[3:]]

    done = await client.get_job(job.job_id, tenant="acme")
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.attempt == 1
    assert (done.model, done.model_version) == ("keywords-clf", 1)
    assert done.progress.step == done.progress.total_steps > 0

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
    # The version is pinned to the digests of the files the runner exported (what serving checks every fetch by).
    export = training.settings.jobs_dir / job.job_id / RUN_DIR / "export"
    for role, name in (("model", "model.pt"), ("model_config", "model_config.json"), ("labels", "labels.json")):
        assert roles[role].sha256 == sha256_file(export / name), role

    # The run's CPU time waits in the service's usage outbox for billing (delivered once mTLS is set up).
    outbox = UsageOutbox(training.settings.data_dir / "training" / "usage-outbox.db")
    try:
        usage = [billing_pb.UsageEvent.FromString(e.payload) for e in outbox.peek(100)]
    finally:
        outbox.close()
    assert [(u.id, u.meter, u.tenant, u.attributes["job"]) for u in usage] == [
        (f"training-job-{job.job_id}-attempt-1", "cpu_core_seconds", "acme", job.job_id)
    ]
    assert float(usage[0].quantity) > 0

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


@pytest.mark.parametrize(
    ("spec_change", "message"),
    [
        ({"dataset": "nope"}, "unknown dataset"),
        ({"base_model": "no-such-model"}, "unknown base model"),
        ({"label_column": "category"}, "category"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"learning_rate": -1.0}, "learning_rate must be > 0"),
        ({"max_seq_length": 128}, "above the base model's maximum of 64"),
    ],
)
async def test_bad_specs_are_rejected_before_anything_runs(
    storage: RunningStorage,
    training: RunningTraining,
    tiny_bert_dir: Path,
    spec_change: dict[str, object],
    message: str,
) -> None:
    await _setup(storage, training, tiny_bert_dir)
    spec = keyword_spec()
    if "dataset" in spec_change:
        spec.dataset.name = str(spec_change["dataset"])
    elif "base_model" in spec_change:
        spec.base_model = str(spec_change["base_model"])
    elif "label_column" in spec_change:
        spec.sequence_classification.label_column = str(spec_change["label_column"])
    elif "learning_rate" in spec_change:
        spec.hyperparameters.learning_rate = float(spec_change["learning_rate"])  # type: ignore[arg-type]
    else:
        spec.hyperparameters.max_seq_length = int(spec_change["max_seq_length"])  # type: ignore[call-overload]
    with pytest.raises(InvalidArgument, match=message):
        await training.client().submit_fine_tune(spec, tenant="acme")
    assert training.executor.launched == []
    assert (await training.client().list_jobs(tenant="acme"))[0] == []
    assert not any(training.settings.jobs_dir.iterdir()) if training.settings.jobs_dir.exists() else True


@pytest.mark.slow
async def test_cancel_and_resume_after_restart(
    storage: RunningStorage, training: RunningTraining, tiny_bert_dir: Path
) -> None:
    await _setup(storage, training, tiny_bert_dir)
    client = training.client()

    # Cancel: the runner stops (checkpointing first) and the job ends CANCELLED.
    cancelled = await client.submit_fine_tune(keyword_spec(epochs=30), tenant="acme")
    async for event in client.watch_job(cancelled.job_id, tenant="acme"):
        if event.HasField("progress") and event.progress.step >= 2:
            break
    await client.cancel_job(cancelled.job_id, tenant="acme", reason="changed my mind")
    events = await _watch(client, cancelled.job_id)
    assert events[-1].state_change.to_state == pb.JOB_STATE_CANCELLED
    job = await client.get_job(cancelled.job_id, tenant="acme")
    assert job.state == pb.JOB_STATE_CANCELLED and "changed my mind" in job.error

    # Restart: a running job is relaunched in its directory and resumes from the checkpoint its runner wrote when
    # the service stopped it.
    job = await client.submit_fine_tune(keyword_spec(epochs=4), tenant="acme")
    before = 0
    async for event in client.watch_job(job.job_id, tenant="acme"):
        if event.HasField("progress") and event.progress.step >= 5:
            before = event.progress.step
            break
    await training.stop()
    assert (await _job_state(training, job.job_id)) == "running"
    restarted = await start_training(training.settings, training.tokens)
    try:
        client = restarted.client()
        events = await _watch(client, job.job_id)
        assert restarted.executor.launched == [job.job_id]
        final = await client.get_job(job.job_id, tenant="acme")
        assert final.attempt == 2
        relaunch = max(
            i
            for i, e in enumerate(events)
            if e.state_change.to_state == pb.JOB_STATE_RUNNING and "attempt 2" in e.state_change.message
        )
        resumed = [e.progress.step for e in events[relaunch:] if e.HasField("progress")]
        assert resumed and min(resumed) > before, (before, resumed)  # the step counter continues
        assert any(e.HasField("metrics") for e in events[relaunch:])
        # The restarted service has no token of the submitter: the job acts for it through the delegation stored
        # (sealed) with the job, and publishes exactly one version.
        assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
        versions = await client.list_model_versions("keywords-clf", tenant="acme")
        assert [(v.version, v.lineage.job_id) for v in versions] == [(1, job.job_id)]
        assert (final.model, final.model_version) == ("keywords-clf", 1)
    finally:
        await restarted.stop()


class HeldExecutor(CountingExecutor):
    """The real local executor, starting runners only at ``start_at`` (wall clock): a job that waits in a queue."""

    def __init__(self, start_at: float) -> None:
        super().__init__()
        self.start_at = start_at

    async def submit(self, job_id: str, argv: Sequence[str], env: Mapping[str, str], workdir: Path) -> LocalHandle:
        await asyncio.sleep(max(0.0, self.start_at - time.time()))
        return await super().submit(job_id, argv, env, workdir)


@pytest.mark.slow
@pytest.mark.auth_env(AIDC_AUTH_ACCESS_TOKEN_TTL_SECONDS="25")
async def test_a_job_outliving_the_submitters_token_publishes_for_the_submitter(
    auth: RunningAuth, storage: RunningStorage, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    token = storage.tokens["acme/dev"]
    expires = jwt.decode(token, options={"verify_signature": False})["exp"]
    # The runner starts only once the submitter's token is refused everywhere (its expiry plus the verifiers' leeway).
    settings = training_settings(tmp_path / "training", auth.address, storage.address)
    training = await start_training(settings, storage.tokens, HeldExecutor(expires + TOKEN_LEEWAY_SECONDS + 1))
    try:
        await _setup(storage, training, tiny_bert_dir)
        job = await training.client().submit_fine_tune(keyword_spec(epochs=2), tenant="acme")
        await _watch(training.client(), job.job_id)  # a stream opened while the token was good runs to the end
        assert time.time() > expires + TOKEN_LEEWAY_SECONDS
        with pytest.raises(Unauthenticated):
            await storage.client("acme/dev").stat("acme", "keywords")  # the submitter's token is long dead

        fresh = (await auth.client().login("acme", "dev", storage_conftest.PASSWORD)).access_token
        storage.tokens["acme/dev"] = training.tokens["acme/dev"] = fresh
        client = training.client()
        final = await client.get_job(job.job_id, tenant="acme")
        assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
        versions = await client.list_model_versions("keywords-clf", tenant="acme")
        assert [(v.version, v.lineage.job_id) for v in versions] == [(1, job.job_id)]
        # Published for the submitter (not as the training service), and the delegation ended with the job.
        files = storage.client("acme/dev")
        for artifact in versions[0].artifacts:
            stat = await files.stat(
                "acme", artifact.name, kind=storage_pb.OBJECT_KIND_ARTIFACT, version=artifact.version
            )
            assert stat.created_by == "user:acme/dev"
        admin = auth.client((await auth.client().login("platform", "admin", auth.admin_password)).access_token)
        events = [(e.action, e.target) for e in await admin.list_audit_events("acme", 200)]
        delegations = [t for a, t in events if a == "delegation.create"]
        assert len(delegations) == 1 and ("delegation.revoke", delegations[0]) in events
    finally:
        await training.stop()


async def _job_state(training: RunningTraining, job_id: str) -> str:
    """The job's state as stored (read straight from the service's database)."""
    from services.mesh.db import open_database
    from services.training.store import TrainingStore

    db = open_database(training.settings.database_url_for("training"))
    try:
        job = TrainingStore(db).job(job_id)
        assert job is not None
        return job.state.value
    finally:
        db.dispose()


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
