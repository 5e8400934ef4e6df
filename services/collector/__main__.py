"""``python -m services.collector``: load config -> logging -> serve until SIGTERM."""

from __future__ import annotations

import logging
import sys

from services.collector.config import CollectorConfig
from services.collector.server import build_server, serve
from services.mesh.logs import configure_logging

__all__ = ["main"]


def main() -> int:
    """Runs the collector; returns the process exit code (2 on bad configuration)."""
    configure_logging("collector")
    try:
        config = CollectorConfig.from_env()
    except ValueError as exc:
        logging.getLogger(__name__).error("bad configuration: %s", exc)
        return 2
    configure_logging("collector", config.log_level)
    try:
        server = build_server(config)
    except OSError as exc:
        logging.getLogger(__name__).error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        return 1
    serve(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
