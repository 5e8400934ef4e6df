"""``aidc train ...`` and ``aidc model ...`` against real auth, storage and training processes (the CLI runs
in-process, as a user would)."""

from __future__ import annotations

import asyncio
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
from tests.conftest import free_port, service_env, start_service_process, stop_process, wait_serving
from tests.storage.conftest import PASSWORD, StorageProcess, process_client
from tests.training.conftest import tiny_model_tar


@pytest.fixture
def training_process(storage_process: StorageProcess, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The training service as its own process next to the auth and storage processes; its mesh and tenant
    addresses."""
    auth = storage_process.auth
    address = f"127.0.0.1:{free_port()}"
    env = service_env(
        auth.data_dir,
        AIDC_AUTH_ADDR=auth.address,
        AIDC_STORAGE_ADDR=storage_process.address,
        AIDC_TRAINING_ADDR=address,
        AIDC_TRAINING_TENANT_ADDR=f"127.0.0.1:{free_port()}",
        AIDC_TRAINING_PROGRESS_INTERVAL_SECONDS="0.2",
        AIDC_TRAINING_RUNNER_THREADS="1",
    )
    process = start_service_process("training", env, tmp_path / "training.log")
    try:
        wait_serving(address, process=process)
        yield address, env["AIDC_TRAINING_TENANT_ADDR"]
    finally:
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
    storage_process: StorageProcess,
    training_process: tuple[str, str],
    tiny_bert_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    training_address, training_tenant_address = training_process
    asyncio.run(_prepare(storage_process, training_address, tiny_bert_dir))
    auth = storage_process.auth
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
    out = ok("train", "submit", "keywords", "-m", "kw", *common, "--epochs", "2", "--watch")
    assert "succeeded" in out and "accuracy" in out
    assert "kw" in ok("model", "list")
    shown = ok("model", "show", "kw")
    assert "kw v1" in shown and "keywords v1" in shown and "parity" in shown and "passed" in shown
    assert "production=v1" in ok("model", "alias", "kw", "production", "1")
    assert "(production)" in ok("model", "show", "kw", "--alias", "production")
    assert "succeeded" in ok("train", "status")
    bad = runner.invoke(app, ["train", "submit", "keywords", "-m", "kw", *common, "--label-column", "nope"])
    assert bad.exit_code == 1 and "INVALID_ARGUMENT" in bad.output
