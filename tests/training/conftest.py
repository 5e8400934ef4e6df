"""Fixtures of the training service tests: real auth, a real storage service on a real SeaweedFS, the real scheduler
running jobs as local processes, and the training service in-process submitting each fine-tune to it, all on the
mesh's mutual TLS; a tiny BERT (built offline) as a tenant's base model."""

from __future__ import annotations

import asyncio
import io
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import grpc
import pytest

from services.auth.config import AuthSettings
from services.cli.session import BearerToken
from services.gen.aidc.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from services.gen.aidc.storage.v1 import storage_service_pb2 as storage_pb
from services.gen.aidc.training.v1 import training_service_pb2 as training_pb
from services.mesh.channels import create_channel
from services.mesh.server import MeshServer
from services.scheduler.config import SchedulerSettings
from services.storage.client import StorageClient
from services.training.client import TrainingClient
from services.training.config import TrainingSettings
from services.training.core.service import JOB_LABEL
from services.training.runner.tiny import build_tiny_bert, keyword_dataset, to_csv
from services.training.server import build_server
from tests.conftest import RunningAuth, database_env, free_port
from tests.scheduler.service_support import RunningScheduler, scheduler_env, start_scheduler
from tests.storage.conftest import RunningStorage, seaweed, storage, storage_process, tokens  # noqa: F401 - fixtures

__all__ = [
    "RunningTraining",
    "keyword_spec",
    "run_job",
    "start_training",
    "tiny_model_tar",
    "training_settings",
    "upload_keywords_and_tiny_bert",
    "wait_for_job",
]

_TERMINAL = {training_pb.JOB_STATE_SUCCEEDED, training_pb.JOB_STATE_FAILED, training_pb.JOB_STATE_CANCELLED}


@pytest.fixture
def settings(settings: AuthSettings, mesh_certs: Path) -> AuthSettings:
    """Auth (and so every service started next to it) on the mesh's mutual TLS: the training service submits runs
    to the scheduler with its service certificate, which the scheduler requires of anyone running a program."""
    return replace(settings, certs_dir=str(mesh_certs))


@pytest.fixture
async def scheduler(
    auth: RunningAuth,
    tokens: dict[str, str],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    service_database: str,
) -> AsyncIterator[RunningScheduler]:
    """The scheduler (a 4-core, 8 GiB local node). Billing is not running: budgets are not checked, and the usage
    the scheduler meters waits in its outbox (not for long at shutdown: tests/training/test_billing.py has billing)."""
    env = scheduler_env(
        tmp_path / "scheduler-data",
        auth.address,
        AIDC_CERTS_DIR=auth.settings.certs_dir,
        AIDC_SHUTDOWN_GRACE_SECONDS="0.5",
        # A cancelled or preempted runner checkpoints before it exits 130: under load that can outlast the 5 s the
        # scheduler's own tests give, and a SIGKILL (137) would fail the tests that check it checkpointed.
        AIDC_SCHEDULER_DEFAULT_GRACE_SECONDS="30",
        **database_env(service_database),
    )
    running = await start_scheduler(SchedulerSettings.from_env(env), tokens)
    yield running
    await running.stop()


@dataclass
class RunningTraining:
    server: MeshServer
    settings: TrainingSettings
    scheduler: RunningScheduler
    tokens: dict[str, str]
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    def client(self, user: str = "acme/dev") -> TrainingClient:
        bearer = BearerToken(self.tokens[user])
        channel = create_channel(
            self.settings.training_addr, self.settings, extra_interceptors=[cast(grpc.aio.ClientInterceptor, bearer)]
        )
        self._channels.append(channel)
        return TrainingClient(channel)

    async def scheduled(self, job_id: str = "") -> list[scheduler_pb.Job]:
        """The scheduler's jobs running training jobs (``job_id``'s only, if given), as the platform admin sees."""
        admin = self.scheduler.client("platform/admin")
        labels = {JOB_LABEL: job_id} if job_id else {}
        found, _ = await admin.list_jobs(labels=labels)
        return [j for j in found if JOB_LABEL in j.labels]

    async def stop(self) -> None:
        for channel in self._channels:
            await channel.close(None)
        self._channels.clear()
        await self.server.stop(0)


def training_settings(
    data_dir: Path, auth: RunningAuth, storage_address: str, scheduler_address: str, **extra: str
) -> TrainingSettings:
    return TrainingSettings.from_env(training_env(data_dir, auth, storage_address, scheduler_address, **extra))


def training_env(
    data_dir: Path, auth: RunningAuth, storage_address: str, scheduler_address: str, **extra: str
) -> dict[str, str]:
    """The settings of a training service on its own port, next to ``auth``, storage and the scheduler."""
    return {
        "AIDC_DATA_DIR": str(data_dir),
        "AIDC_CERTS_DIR": auth.settings.certs_dir,
        "AIDC_AUTH_ADDR": auth.address,
        "AIDC_STORAGE_ADDR": storage_address,
        "AIDC_SCHEDULER_ADDR": scheduler_address,
        "AIDC_TRAINING_ADDR": f"127.0.0.1:{free_port()}",
        "AIDC_TRAINING_PROGRESS_INTERVAL_SECONDS": "0.2",
        "AIDC_TRAINING_RUNNER_THREADS": "1",
        **extra,
    }


async def start_training(
    settings: TrainingSettings, user_tokens: dict[str, str], scheduler: RunningScheduler
) -> RunningTraining:
    server = await build_server(settings, settings.training_addr)
    await server.start()
    await server.wait_ready()
    return RunningTraining(server, settings, scheduler, user_tokens)


@pytest.fixture
async def training(
    auth: RunningAuth,
    storage: RunningStorage,  # noqa: F811 - the fixture imported above
    scheduler: RunningScheduler,
    tmp_path: Path,
    service_database: str,
) -> AsyncIterator[RunningTraining]:
    settings = training_settings(
        tmp_path / "training", auth, storage.address, scheduler.address, **database_env(service_database)
    )
    running = await start_training(settings, storage.tokens, scheduler)
    yield running
    await running.stop()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [text for text, _ in keyword_dataset(2000, seed=99)]
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts, max_position_embeddings=64)


def tiny_model_tar(model_dir: Path) -> bytes:
    """The model directory as a gzip tar (what a tenant uploads to register a base model)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=f"tiny-bert/{path.name}")
    return out.getvalue()


def keyword_spec(**hyper: float | int) -> training_pb.FineTuneSpec:
    """Fine-tune of tenant base model tiny-bert on dataset "keywords" into model "keywords-clf" (a few seconds)."""
    values: dict[str, float | int] = {
        "epochs": 3,
        "batch_size": 8,
        "warmup_ratio": 0.1,
        "learning_rate": 3e-3,
        "max_seq_length": 32,
        "eval_fraction": 0.2,
        "seed": 7,
    }
    values.update(hyper)
    return training_pb.FineTuneSpec(
        base_model="tiny-bert",
        dataset=training_pb.DatasetRef(name="keywords"),
        sequence_classification=training_pb.SequenceClassificationTask(),
        hyperparameters=training_pb.Hyperparameters(**values),  # type: ignore[arg-type]
        output_model="keywords-clf",
    )


async def upload_keywords_and_tiny_bert(
    files: StorageClient, training: TrainingClient, tiny_bert: Path
) -> training_pb.BaseModel:
    """acme uploads the keyword dataset and the tiny BERT, and registers it as base model tiny-bert."""
    await files.create_dataset("acme", "keywords")
    await files.upload(
        "acme",
        "keywords",
        to_csv(keyword_dataset(600, seed=1)),
        text_dataset=storage_pb.TextDatasetSpec(format=storage_pb.DATA_FORMAT_CSV),
    )
    await files.upload(
        "acme", "bases/tiny-bert.tar.gz", tiny_model_tar(tiny_bert), kind=storage_pb.OBJECT_KIND_ARTIFACT
    )
    return await training.register_base_model("tiny-bert", "bases/tiny-bert.tar.gz", tenant="acme")


async def run_job(training: TrainingClient, spec: training_pb.FineTuneSpec) -> training_pb.Job:
    """Submits ``spec`` for acme and follows the job until it ends; the final job."""
    job = await training.submit_fine_tune(spec, tenant="acme")
    async for event in training.watch_job(job.job_id, tenant="acme"):
        if event.HasField("state_change") and event.state_change.to_state in _TERMINAL:
            break
    return await training.get_job(job.job_id, tenant="acme")


async def wait_for_job(
    training: TrainingClient,
    job_id: str,
    predicate: Callable[[training_pb.Job], bool],
    *,
    what: str,
    tenant: str = "acme",
    timeout: float = 120.0,
) -> training_pb.Job:
    """Polls the job until ``predicate`` holds (generous timeout: the machine is shared)."""
    deadline = time.monotonic() + timeout
    job = await training.get_job(job_id, tenant=tenant)
    while not predicate(job):
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} never got {what}: {training_pb.JobState.Name(job.state)} {job}")
        await asyncio.sleep(0.1)
        job = await training.get_job(job_id, tenant=tenant)
    return job
