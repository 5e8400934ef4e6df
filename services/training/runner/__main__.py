"""Runs one fine-tune job in this process: python -m services.training.runner --help"""

from __future__ import annotations

import os
import sys

# scipy's OpenBLAS (loaded by transformers, never called by training) allocates its buffer as it loads. Under a job's
# memory limit an allocation failing there can spin forever instead of failing, so it loads first, while this process
# is small (the training service asks at least MIN_MEMORY_BYTES of a job); what fails later fails in Python or torch,
# and says it ran out of memory.
import scipy.linalg  # noqa: F401

from services.mesh.files import use_private_umask
from services.mesh.logs import configure_logging
from services.training.runner.main import main

if __name__ == "__main__":
    # stdout belongs to the event protocol alone: events go to a private duplicate of it, and whatever else writes
    # to file descriptor 1 (a library's print, a native progress bar) is sent to stderr instead.
    events = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    use_private_umask()  # checkpoints, exports and event files are the platform user's alone
    configure_logging("training-runner")
    sys.exit(main(stdout=events))
