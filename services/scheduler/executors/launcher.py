"""A worker's launcher: runs the worker as its child and writes its exit status to a file, so a scheduler that
restarted meanwhile (and is no longer the parent) still learns how the worker ended.

Run as a script with the standard library only (``python -I -S launcher.py STATUS_FILE PID_FILE [MEMORY_BYTES] --
argv...``): it is the session leader of the worker's process group, so signals sent to the group reach the worker
directly. It outlives SIGTERM (the worker decides what SIGTERM means: checkpoint, then exit) but not SIGKILL.

With MEMORY_BYTES (the memory the worker was admitted with) the worker's data segment may not grow past it
(RLIMIT_DATA: the heap and every private writable mapping, which is what a process's allocations take): an allocation
beyond it fails in the worker (Python's MemoryError), instead of the machine's other jobs paying for it.
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


def _limit_memory(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def main(argv: list[str]) -> int:
    separator = argv.index("--") if "--" in argv else -1
    if separator not in (2, 3) or separator == len(argv) - 1 or not all(a.isdigit() for a in argv[2:separator]):
        print("usage: launcher.py STATUS_FILE PID_FILE [MEMORY_BYTES] -- PROGRAM [ARG...]", file=sys.stderr)
        return 2
    status_file, pid_file, command = argv[0], argv[1], argv[separator + 1 :]
    memory = int(argv[2]) if separator == 3 else 0
    # A handler (not SIG_IGN): the worker gets the default dispositions back on exec.
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, lambda *_: None)
    _write(pid_file, {"pid": os.getpid(), "start_ticks": _start_ticks(os.getpid())})
    started = time.time()
    try:
        child = subprocess.Popen(
            command, restore_signals=True, preexec_fn=(lambda: _limit_memory(memory)) if memory else None
        )
    except OSError as exc:
        _write(status_file, {"exit_code": 127, "reason": f"could not start {command[0]!r}: {exc.strerror}"})
        return 127
    code = child.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    exit_code = 128 - code if code < 0 else code
    reason = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    if memory and code < 0 and -code not in (signal.SIGTERM, signal.SIGKILL):
        # A native allocation past the limit aborts (or faults) rather than raising.
        reason += f" (its memory was limited to its request, {memory} bytes)"
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
