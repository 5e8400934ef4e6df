"""The allocator tuning every service (and the CLI's transfer commands) applies: a process receiving megabyte
messages reuses their memory instead of faulting fresh pages in for each one."""

from __future__ import annotations

import subprocess
import sys

_RECEIVE = """
import resource, sys
from services.mesh.memory import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator()
payload = bytes(2 * 1024 * 1024)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    message = b"\\x12" + payload  # a ~2 MiB message as gRPC hands it over
    chunk = message[1:]  # its chunk, taken out of it
    del message, chunk
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _RECEIVE, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_received_messages_reuse_memory_instead_of_faulting_pages_in() -> None:
    # glibc's own thresholds return the two freed messages to the kernel each time: ~1,000 faults per message.
    untuned, tuned = _faults("default"), _faults("tuned")
    assert untuned > 40 * 500
    assert tuned < 40 * 50, f"{tuned} page faults for 40 messages of 2 MiB"
