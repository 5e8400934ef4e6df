"""Collector settings from the environment: where it listens, which data directory's span store it feeds."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_ADDR", "DEFAULT_DATA_DIR", "DEFAULT_MAX_BODY_BYTES", "CollectorConfig"]

DEFAULT_ADDR = "127.0.0.1:50060"
DEFAULT_DATA_DIR = ".aidc"
#: Largest request body accepted; Triton's and the SDK's batches are far smaller.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class CollectorConfig:
    """Where the collector listens (``host``/``port``; port 0 = any free port) and the data dir it feeds."""

    host: str = "127.0.0.1"
    port: int = 50060
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_grace_seconds: float = 5.0
    log_level: str = "INFO"

    @property
    def traces_dir(self) -> Path:
        """The span store directory the collector appends to."""
        return self.data_dir / "traces"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> CollectorConfig:
        """Reads ``AIDC_COLLECTOR_ADDR`` (default 127.0.0.1:50060), ``AIDC_DATA_DIR`` (default .aidc) and
        ``AIDC_LOG_LEVEL`` (default INFO).

        Raises ValueError with the variable's name when a value can't work.
        """
        host, port = _parse_address(env.get("AIDC_COLLECTOR_ADDR", "") or DEFAULT_ADDR)
        data_dir = env.get("AIDC_DATA_DIR", "") or DEFAULT_DATA_DIR
        log_level = (env.get("AIDC_LOG_LEVEL", "") or "INFO").strip().upper()
        if log_level not in _LOG_LEVELS:
            raise ValueError(f"AIDC_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, not {log_level!r}")
        return cls(host=host, port=port, data_dir=Path(data_dir), log_level=log_level)


def _parse_address(value: str) -> tuple[str, int]:
    """Splits ``host:port`` (IPv6 as ``[::1]:port``)."""
    host, sep, port = value.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535 or any(c in host for c in "/ "):
        raise ValueError(f"AIDC_COLLECTOR_ADDR must be HOST:PORT (e.g. {DEFAULT_ADDR}), not {value!r}")
    return host, int(port)
