"""OS process helpers for the supervisor: identity by (pid, start time), session signalling, port checks.

Every component runs in its own session (``start_new_session``), so its session id equals its pid and every
process it forks (Triton's python backend stubs) shares that id. A session id cannot be handed to a new
process while any member is alive, so signalling the members found under /proc never hits a stranger.
Linux only.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from services.mesh.config import parse_address

__all__ = [
    "ProcessId",
    "process_id",
    "is_running",
    "session_members",
    "signal_session",
    "terminate_session",
    "wait_gone",
    "busy_addresses",
]

logger = logging.getLogger(__name__)

_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessId:
    """A pid plus its kernel start time, so a recycled pid is never mistaken for the process we started."""

    pid: int
    start_ticks: int


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, pgrp, session, ...), or None if the pid doesn't exist."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses; it ends at the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def process_id(pid: int) -> ProcessId | None:
    """The identity of a live process, or None."""
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return ProcessId(pid, int(fields[19]))


def is_running(ident: ProcessId) -> bool:
    """True while that very process runs (zombies count as gone)."""
    return process_id(ident.pid) == ident


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of a session."""
    members = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is not None and fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def signal_session(sid: int, sig: signal.Signals) -> list[int]:
    """Sends a signal to every live member of a session; returns the members signalled."""
    members = session_members(sid)
    if not members:
        return []
    try:
        os.killpg(sid, sig)
    except ProcessLookupError:
        pass
    for pid in members:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return members


def wait_gone(sid: int, timeout: float) -> bool:
    """Waits until a session has no live member; True when it emptied in time."""
    deadline = time.monotonic() + timeout
    while session_members(sid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def terminate_session(sid: int, grace: float) -> list[int]:
    """SIGTERM a whole session, SIGKILL whatever is left after the grace period; returns the pids it had."""
    members = signal_session(sid, signal.SIGTERM)
    if members and not wait_gone(sid, grace):
        logger.warning("session %d still alive after %.1fs; sending SIGKILL", sid, grace)
        signal_session(sid, signal.SIGKILL)
        if not wait_gone(sid, 5.0):
            logger.error("session %d survived SIGKILL: %s", sid, session_members(sid))
    return members


def busy_addresses(addresses: list[str]) -> list[str]:
    """The host:port addresses something already listens on (or that can't be bound for another reason)."""
    busy = []
    for address in addresses:
        host, port = parse_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # Servers set SO_REUSEADDR, so a TIME_WAIT leftover doesn't stop them; nor should it stop us.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                busy.append(address)
    return busy
