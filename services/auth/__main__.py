"""Runs the auth service: python -m services.auth"""

from __future__ import annotations

from services.auth.config import AuthSettings
from services.auth.server import build_server
from services.mesh.logs import configure_logging
from services.mesh.server import serve
from services.mesh.telemetry import init_telemetry


def main() -> None:
    settings = AuthSettings.from_env()
    configure_logging("auth", settings.log_level)
    init_telemetry("auth", settings.data_dir)
    serve(lambda: build_server(settings))


if __name__ == "__main__":
    main()
