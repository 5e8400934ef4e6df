"""Runs the auth service: python -m services.auth"""

from __future__ import annotations

from services.auth.config import AuthSettings
from services.auth.server import build_server
from services.mesh.server import run_service

if __name__ == "__main__":
    run_service("auth", AuthSettings.from_env, build_server)
