"""Runs one fine-tune job in this process: python -m services.training.runner --help"""

from __future__ import annotations

import os
import sys

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
