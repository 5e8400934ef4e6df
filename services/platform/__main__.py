"""Entry point of the detached supervisor that `aidc up --detach` starts in the background."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from services.mesh.logs import configure_logging
from services.platform.components import build_components
from services.platform.supervisor import AlreadyRunning, StartupError, Supervisor, load_platform


def main(argv: list[str] | None = None) -> int:
    """Runs the supervisor until SIGTERM; 0 after a clean stop, 1 when the platform can't start."""
    parser = argparse.ArgumentParser(prog="python -m services.platform", description=__doc__)
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for every component")
    args = parser.parse_args(argv)
    platform = load_platform()
    configure_logging("supervisor", platform.mesh.log_level)
    supervisor = Supervisor(platform, build_components(platform), startup_timeout=args.timeout)
    try:
        asyncio.run(supervisor.run())
    except (StartupError, AlreadyRunning) as exc:
        logging.getLogger("services.platform").error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
