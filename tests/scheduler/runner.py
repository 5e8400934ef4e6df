"""A small job for the scheduler's tests: counts steps, checkpoints on SIGTERM and resumes from its checkpoint.

    python runner.py --steps 20 --step-seconds 0.1 [--fail-code N] [--ignore-term] [--checkpoint-every N]

State lives in the working directory (the job's): ``checkpoint-<worker>.json`` (the next step), and one JSON line
per event in ``events-<worker>.jsonl`` (start with the step it resumed from, checkpoint, done), each with the wall
time, the attempt and the trace context it was given, so a test can see what the process really did.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

_stop = False


def _save(checkpoint: Path, step: int) -> None:
    # Atomically, as a real runner saves (LocalArtifactStore.put): a worker killed with its node mid-write must
    # leave the previous checkpoint, not an empty file the next attempt cannot read.
    partial = checkpoint.with_suffix(".partial")
    partial.write_text(json.dumps({"step": step}))
    os.replace(partial, checkpoint)


def _on_term(*_: object) -> None:
    global _stop
    _stop = True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-seconds", type=float, default=0.1)
    parser.add_argument("--fail-code", type=int, default=0, help="exit with this code instead of finishing")
    parser.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM (to be SIGKILLed)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    args = parser.parse_args()
    worker = os.environ.get("AIDC_WORKER_INDEX", "0")
    checkpoint = Path(f"checkpoint-{worker}.json")
    events = Path(f"events-{worker}.jsonl")

    def event(kind: str, **data: object) -> None:
        record = {
            "event": kind,
            "time_ns": time.time_ns(),
            "attempt": int(os.environ.get("AIDC_JOB_ATTEMPT", "0")),
            "pid": os.getpid(),
            **data,
        }
        with events.open("a") as out:
            out.write(json.dumps(record) + "\n")

    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_term else _on_term)
    step = json.loads(checkpoint.read_text())["step"] if checkpoint.exists() else 0
    event(
        "start",
        step=step,
        traceparent=os.environ.get("TRACEPARENT", ""),
        secret=os.environ.get("API_TOKEN", ""),
        platform_variables=sorted(k for k in os.environ if k.startswith(("AIDC_", "AWS_", "PG", "OTEL_"))),
        node=os.environ.get("AIDC_NODE", ""),
    )
    print(f"worker {worker} starting at step {step}", flush=True)
    if args.fail_code:
        event("fail", code=args.fail_code)
        return args.fail_code
    while step < args.steps:
        if _stop:
            _save(checkpoint, step)
            event("checkpoint", step=step)
            return 143
        time.sleep(args.step_seconds)
        step += 1
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            _save(checkpoint, step)
    _save(checkpoint, step)
    event("done", step=step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
