"""Fixtures of the serving tests: real auth, storage (on a real SeaweedFS), scheduler and training services
in-process on the mesh's mutual TLS, a real tritonserver process, and the serving service in-process; fine-tunes of
a tiny BERT register the versions that get deployed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
import pytest

from services.cli.session import BearerToken
from services.gen.aidc.training.v1 import training_service_pb2 as training_pb
from services.mesh.channels import create_channel
from services.mesh.server import MeshServer
from services.serving.client import ServingClient, TextClassifierClient
from services.serving.config import ServingSettings
from services.serving.server import build_server
from tests.conftest import RunningAuth, database_env, free_port
from tests.serving.triton import TritonProcess
from tests.storage.conftest import RunningStorage, seaweed, storage, tokens  # noqa: F401 - fixtures
from tests.training.conftest import (  # noqa: F401 - fixtures
    RunningTraining,
    keyword_spec,
    run_job,
    scheduler,
    settings,
    tiny_bert_dir,
    training,
    upload_keywords_and_tiny_bert,
)

__all__ = ["RunningServing", "start_serving", "serving_env", "fine_tune"]


@pytest.fixture
def triton(tmp_path: Path) -> Iterator[TritonProcess]:
    process = TritonProcess(tmp_path / "model_repository", tmp_path / "triton")
    process.start()
    yield process
    process.stop()


def serving_env(
    data_dir: Path,
    auth_addr: str,
    storage_addr: str,
    training_addr: str,
    triton: TritonProcess,
    certs_dir: str = "",
    database_url: str = "",
) -> dict[str, str]:
    """The settings of a serving service in front of ``triton`` (its own port, usage to no billing)."""
    return {
        "AIDC_DATA_DIR": str(data_dir),
        "AIDC_CERTS_DIR": certs_dir,
        # Usage goes to no billing; a stop does not wait for it.
        "AIDC_SHUTDOWN_GRACE_SECONDS": "0.5",
        "AIDC_AUTH_ADDR": auth_addr,
        "AIDC_STORAGE_ADDR": storage_addr,
        "AIDC_TRAINING_ADDR": training_addr,
        "AIDC_BILLING_ADDR": f"127.0.0.1:{free_port()}",
        "AIDC_SERVING_ADDR": f"127.0.0.1:{free_port()}",
        **triton.serving_env(),
        "AIDC_MODEL_REPOSITORY": str(triton.repository),
        "AIDC_SERVING_RECONCILE_INTERVAL_SECONDS": "0.3",
        "AIDC_SERVING_ROLLOUT_TIMEOUT_SECONDS": "120",
        **database_env(database_url),
    }


@dataclass
class RunningServing:
    server: MeshServer
    settings: ServingSettings
    tokens: dict[str, str]
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    def channel(self, user: str = "acme/dev") -> grpc.aio.Channel:
        bearer = BearerToken(self.tokens[user])
        channel = create_channel(
            self.settings.serving_addr, self.settings, extra_interceptors=[cast(grpc.aio.ClientInterceptor, bearer)]
        )
        self._channels.append(channel)
        return channel

    def client(self, user: str = "acme/dev") -> ServingClient:
        return ServingClient(self.channel(user))

    def classifier(self, user: str = "acme/dev") -> TextClassifierClient:
        return TextClassifierClient(self.channel(user))

    async def stop(self) -> None:
        for channel in self._channels:
            await channel.close(None)
        self._channels.clear()
        await self.server.stop(0)


async def start_serving(config: ServingSettings, user_tokens: dict[str, str]) -> RunningServing:
    server = await build_server(config, config.serving_addr)
    await server.start()
    await server.wait_ready()
    return RunningServing(server, config, user_tokens)


@pytest.fixture
async def serving(
    auth: RunningAuth,
    storage: RunningStorage,  # noqa: F811 - the fixture imported above
    training: RunningTraining,  # noqa: F811
    triton: TritonProcess,
    tmp_path: Path,
    service_database: str,
) -> AsyncIterator[RunningServing]:
    config = ServingSettings.from_env(
        serving_env(
            tmp_path / "serving",
            auth.address,
            storage.address,
            training.settings.training_addr,
            triton,
            auth.settings.certs_dir,
            service_database,
        )
    )
    running = await start_serving(config, storage.tokens)
    yield running
    await running.stop()


async def fine_tune(
    files_service: RunningStorage, trainer: RunningTraining, tiny_bert: Path, *, seeds: tuple[int, ...] = (7,)
) -> list[int]:
    """acme/dev fine-tunes the tiny BERT on keyword data once per seed into model "keywords-clf"; the versions."""
    client = trainer.client()
    await upload_keywords_and_tiny_bert(files_service.client("acme/dev"), client, tiny_bert)
    versions = []
    for seed in seeds:
        done = await run_job(client, keyword_spec(seed=seed))
        assert done.state == training_pb.JOB_STATE_SUCCEEDED, done.error
        versions.append(done.model_version)
    return versions
