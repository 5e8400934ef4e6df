"""Executors of the scheduler: the interface, and local processes (the embedded default)."""

from __future__ import annotations

from services.scheduler.executors.base import EXIT_LOST, Executor, ExitStatus, LaunchRequest, Run, WorkerRef
from services.scheduler.executors.local import LocalExecutor

__all__ = ["EXIT_LOST", "Executor", "ExitStatus", "LaunchRequest", "LocalExecutor", "Run", "WorkerRef"]
