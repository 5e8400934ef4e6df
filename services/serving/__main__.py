"""Runs the serving service: python -m services.serving"""

from __future__ import annotations

from services.mesh.server import run_service
from services.serving.config import ServingSettings
from services.serving.server import build_server

if __name__ == "__main__":
    run_service("serving", ServingSettings.from_env, build_server)
