"""Fixtures of the scheduler tests: auth (and every service a test starts next to it) on the mesh's mutual TLS, since
only mesh services and platform admins may submit jobs: a test submits as the training service does, over that
service's certificate with the user's token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from services.auth.config import AuthSettings
from services.scheduler.config import SchedulerSettings
from tests.conftest import RunningAuth, database_env
from tests.scheduler.service_support import RunningScheduler, scheduler_env, start_scheduler, user_tokens


@pytest.fixture
def settings(settings: AuthSettings, mesh_certs: Path) -> AuthSettings:
    """The suite's auth settings, with the session's mesh certificates."""
    return replace(settings, certs_dir=str(mesh_certs))


@pytest.fixture
async def scheduler(auth: RunningAuth, tmp_path: Path, service_database: str) -> AsyncIterator[RunningScheduler]:
    """The scheduler service in this process (a 4-core, 8 GiB local node), on ``service_database``."""
    tokens = await user_tokens(auth)
    env = scheduler_env(
        tmp_path / "data", auth.address, AIDC_CERTS_DIR=auth.settings.certs_dir, **database_env(service_database)
    )
    running = await start_scheduler(SchedulerSettings.from_env(env), tokens)
    yield running
    await running.stop()
