"""Runs the scheduler service: python -m services.scheduler"""

from __future__ import annotations

from services.mesh.server import run_service
from services.scheduler.config import SchedulerSettings
from services.scheduler.server import build_server

if __name__ == "__main__":
    run_service("scheduler", SchedulerSettings.from_env, build_server)
