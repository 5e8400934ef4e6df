"""What a runner process inherits from the training service: nothing of its settings or credentials."""

from __future__ import annotations

import pytest

from services.training.core.executor import runner_environment


def test_runner_environment_drops_settings_and_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIDC_AUTH_MASTER_KEY", "secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("PGPASSWORD", "secret")
    monkeypatch.setenv("PGHOST", "db")
    env = runner_environment({"OMP_NUM_THREADS": "1"})
    assert not [k for k in env if k.startswith(("AIDC_", "AWS_", "PG"))]
    assert env["OMP_NUM_THREADS"] == "1" and env["PATH"]
