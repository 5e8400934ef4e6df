"""Fixtures of the scheduler tests: auth (and every service a test starts next to it) on the mesh's mutual TLS, since
only mesh services and platform admins may submit jobs: a test submits as the training service does, over that
service's certificate with the user's token."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from services.auth.config import AuthSettings


@pytest.fixture
def settings(settings: AuthSettings, mesh_certs: Path) -> AuthSettings:
    """The suite's auth settings, with the session's mesh certificates."""
    return replace(settings, certs_dir=str(mesh_certs))
