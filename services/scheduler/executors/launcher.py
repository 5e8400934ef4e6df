"""A worker's launcher: runs the worker as its child and writes its exit status to a file, so a scheduler that
restarted meanwhile (and is no longer the parent) still learns how the worker ended.

Run as a script with the standard library only (``python -I -S launcher.py STATUS_FILE PID_FILE -- argv...``): it
is the session leader of the worker's process group, so signals sent to the group reach the worker directly. It
outlives SIGTERM (the worker decides what SIGTERM means: checkpoint, then exit) but not SIGKILL.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time


def _write(path: str, payload: dict[str, object]) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as out:
        json.dump(payload, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def _start_ticks(pid: int) -> str:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().rpartition(")")[2].split()[19]


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: launcher.py STATUS_FILE PID_FILE -- PROGRAM [ARG...]", file=sys.stderr)
        return 2
    status_file, pid_file, command = argv[0], argv[1], argv[3:]
    # A handler (not SIG_IGN): the worker gets the default dispositions back on exec.
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, lambda *_: None)
    _write(pid_file, {"pid": os.getpid(), "start_ticks": _start_ticks(os.getpid())})
    started = time.time()
    try:
        child = subprocess.Popen(command, restore_signals=True)
    except OSError as exc:
        _write(status_file, {"exit_code": 127, "reason": f"could not start {command[0]!r}: {exc.strerror}"})
        return 127
    code = child.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    exit_code = 128 - code if code < 0 else code
    reason = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    _write(
        status_file,
        {
            "exit_code": exit_code,
            "reason": reason,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "wall_seconds": time.time() - started,
            "end_time_ns": time.time_ns(),
        },
    )
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
