"""Runs the training service: python -m services.training"""

from __future__ import annotations

from services.mesh.server import run_service
from services.training.config import TrainingSettings
from services.training.server import build_server

if __name__ == "__main__":
    run_service("training", TrainingSettings.from_env, build_server)
