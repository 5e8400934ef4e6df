"""``aidc train ...`` and ``aidc model ...`` against real auth, storage, scheduler and training processes on the
mesh's mutual TLS (the CLI runs in-process, as a user would, with the CLI's certificate)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest
import typer
from typer.testing import CliRunner

from services.auth.client import AuthClient
from services.cli.main import _AidcGroup
from services.cli.main import app as main_app
from services.cli.session import BearerToken
from services.cli.training_cmd import register
from services.gen.aidc.storage.v1 import storage_service_pb2 as storage_pb
from services.mesh.channels import create_channel
from services.training.client import TrainingClient
from services.training.runner.tiny import keyword_dataset, to_csv
from tests.conftest import (
    free_port,
    service_env,
    start_auth_process,
    start_service_process,
    stop_process,
    wait_serving,
)
from tests.scheduler.service_support import scheduler_env
from tests.storage.conftest import PASSWORD, StorageProcess, process_client, start_storage_process
from tests.storage.seaweed import SeaweedFS
from tests.training.conftest import tiny_model_tar


@pytest.fixture
def mesh_processes(seaweed: SeaweedFS, mesh_certs: Path, tmp_path: Path) -> Iterator[tuple[StorageProcess, str, str]]:
    """Auth, storage, the scheduler and the training service, each its own process, on mutual TLS; the storage
    process and the training service's mesh and tenant addresses."""
    certs = str(mesh_certs)
    quiet = {
        "AIDC_CERTS_DIR": certs,
        "AIDC_BILLING_ADDR": f"127.0.0.1:{free_port()}",
        "AIDC_SHUTDOWN_GRACE_SECONDS": "1",
    }
    auth = start_auth_process(tmp_path, AIDC_CERTS_DIR=certs)
    processes = [auth.process]
    try:
        storage = start_storage_process(auth, seaweed, tmp_path, **quiet)
        processes.append(storage.process)
        scheduler_address = f"127.0.0.1:{free_port()}"
        data = auth.data_dir
        scheduler = start_service_process(
            "scheduler",
            service_env(data, **scheduler_env(data, auth.address, **quiet, AIDC_SCHEDULER_ADDR=scheduler_address)),
            tmp_path / "scheduler.log",
        )
        processes.append(scheduler)
        address = f"127.0.0.1:{free_port()}"
        env = service_env(
            data,
            **quiet,
            AIDC_AUTH_ADDR=auth.address,
            AIDC_STORAGE_ADDR=storage.address,
            AIDC_SCHEDULER_ADDR=scheduler_address,
            AIDC_TRAINING_ADDR=address,
            AIDC_TRAINING_PROGRESS_INTERVAL_SECONDS="0.2",
            AIDC_TRAINING_RUNNER_THREADS="1",
        )
        training = start_service_process("training", env, tmp_path / "training.log")
        processes.append(training)
        wait_serving(scheduler_address, timeout=60, process=scheduler, certs=certs)
        wait_serving(address, timeout=60, process=training, certs=certs)
        yield storage, address, env["AIDC_TRAINING_TENANT_ADDR"]
    finally:
        for process in reversed(processes):
            stop_process(process)


async def _prepare(storage_process: StorageProcess, training_address: str, tiny_bert_dir: Path) -> None:
    """acme/dev uploads a dataset and the tiny BERT and registers it as base model tiny-bert."""
    files, _ = await process_client(storage_process, "acme", "dev")
    try:
        await files.create_dataset("acme", "keywords")
        await files.upload(
            "acme",
            "keywords",
            to_csv(keyword_dataset(300, seed=1)),
            text_dataset=storage_pb.TextDatasetSpec(format=storage_pb.DATA_FORMAT_CSV),
        )
        await files.upload(
            "acme", "bases/tiny.tar.gz", tiny_model_tar(tiny_bert_dir), kind=storage_pb.OBJECT_KIND_ARTIFACT
        )
        auth = AuthClient(create_channel(storage_process.auth.address, storage_process.settings))
        token = (await auth.login("acme", "dev", PASSWORD)).access_token
        await auth.close()
        bearer = cast(grpc.aio.ClientInterceptor, BearerToken(token))
        training = TrainingClient(
            create_channel(training_address, storage_process.settings, extra_interceptors=[bearer])
        )
        try:
            await training.register_base_model("tiny-bert", "bases/tiny.tar.gz", tenant="acme")
        finally:
            await training.close()
    finally:
        await files.close()


def test_train_and_model_commands(
    mesh_processes: tuple[StorageProcess, str, str],
    mesh_certs: Path,
    tiny_bert_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage_process, training_address, training_tenant_address = mesh_processes
    asyncio.run(_prepare(storage_process, training_address, tiny_bert_dir))
    auth = storage_process.auth
    # The CLI is a tenant's client: the tenant endpoints, trusting the mesh's CA (no client certificate).
    monkeypatch.setenv("AIDC_CERTS_DIR", str(mesh_certs))
    monkeypatch.setenv("AIDC_AUTH_TENANT_ADDR", auth.env["AIDC_AUTH_TENANT_ADDR"])
    monkeypatch.setenv("AIDC_STORAGE_TENANT_ADDR", storage_process.env["AIDC_STORAGE_TENANT_ADDR"])
    monkeypatch.setenv("AIDC_TRAINING_TENANT_ADDR", training_tenant_address)
    monkeypatch.setenv("AIDC_DATA_DIR", str(auth.data_dir))
    monkeypatch.setenv("AIDC_CREDENTIALS_FILE", str(auth.data_dir / "cli-credentials.json"))
    monkeypatch.setenv("COLUMNS", "200")
    app = typer.Typer(cls=_AidcGroup)
    register(app)
    runner = CliRunner()
    login = runner.invoke(main_app, ["login", "-t", "acme", "-u", "dev", "--password-stdin"], input=PASSWORD)
    assert login.exit_code == 0, login.output

    def ok(*args: str) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, f"{args}: {result.output}"
        return result.output

    common = ["-b", "tiny-bert", "--max-seq-length", "32", "--batch-size", "8", "--learning-rate", "0.003"]
    out = ok("train", "submit", "keywords", "-m", "kw", *common, "--epochs", "2", "--cpu", "1500m", "--watch")
    assert "succeeded" in out and "accuracy" in out
    # The run's path through the scheduler, and its place there.
    assert "scheduler: queued" in out and "scheduler: running on local" in out, out
    assert re.search(r"scheduler\s+j-[0-9a-f]+ succeeded: exit code 0", out), out
    assert "kw" in ok("model", "list")
    shown = ok("model", "show", "kw")
    assert "kw v1" in shown and "keywords v1" in shown and "parity" in shown and "passed" in shown
    assert "production=v1" in ok("model", "alias", "kw", "production", "1")
    assert "(production)" in ok("model", "show", "kw", "--alias", "production")
    assert "succeeded" in ok("train", "status")
    bad = runner.invoke(app, ["train", "submit", "keywords", "-m", "kw", *common, "--label-column", "nope"])
    assert bad.exit_code == 1 and "INVALID_ARGUMENT" in bad.output
