"""Runs the storage service: python -m services.storage"""

from __future__ import annotations

from services.storage.config import StorageSettings
from services.storage.server import build_server
from services.mesh.server import run_service

if __name__ == "__main__":
    run_service("storage", StorageSettings.from_env, build_server)
