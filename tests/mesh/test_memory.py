"""The allocator tuning every service (and the CLI's transfer commands) applies: a process receiving megabyte
messages reuses their memory instead of faulting fresh pages in for each one. The tuning is measured in fresh
processes: as such, after a service's start through run_service, and after a CLI storage command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_RECEIVE = """
import resource, sys

def receive():
    payload = bytes(3 * 1024 * 1024)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        message = b"\\x12" + payload  # a ~3 MiB message as gRPC hands it over
        chunk = message[1:]  # a copy of its chunk
        del message, chunk
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

mode = sys.argv[1]
if mode == "tuned":
    from services.mesh.memory import tune_allocator
    assert tune_allocator()
elif mode == "service":  # a service's process, as far as loading its settings
    from services.mesh.server import run_service
    def load_settings():
        receive()
        sys.exit(0)
    run_service("probe", load_settings, None)
elif mode == "cli":  # a storage command, which fails here (nobody logged in) after its start
    from services.cli.main import app
    try:
        app(["dataset", "list"])
    except SystemExit as end:
        assert end.code != 0
receive()
"""


def _faults(mode: str, tmp_path: Path) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDC_")} | {"AIDC_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", _RECEIVE, mode], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


def test_received_messages_reuse_memory_instead_of_faulting_pages_in(tmp_path: Path) -> None:
    # glibc's own thresholds return the two freed messages to the kernel each time: ~1,500 faults per message
    # (~61,000 in all). Tuned, only the first message's pages fault in (~1,540, ~2,300 with the interpreter's).
    untuned, tuned = _faults("default", tmp_path), _faults("tuned", tmp_path)
    assert untuned > 40 * 700
    assert tuned < 40 * 100, f"{tuned} page faults for 40 messages of 3 MiB"


def test_every_service_and_the_clis_storage_commands_tune_it(tmp_path: Path) -> None:
    for mode in ("service", "cli"):
        faults = _faults(mode, tmp_path)
        assert faults < 40 * 100, f"{mode}: {faults} page faults for 40 messages of 3 MiB"
