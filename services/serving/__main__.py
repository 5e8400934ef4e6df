"""Runs the serving service: python -m services.serving"""

from __future__ import annotations

from services.serving.config import ServingSettings
from services.serving.server import build_server
from services.mesh.server import run_service

if __name__ == "__main__":
    run_service("serving", ServingSettings.from_env, build_server)
