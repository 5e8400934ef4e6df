"""Starts the real collector (``python -m services.collector``) as a subprocess for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CollectorProcess", "free_port", "post", "running_collector"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_START_TIMEOUT_S = 20.0


@dataclass
class CollectorProcess:
    """A running collector: its process, port, data directory and log file."""

    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, what OTEL_EXPORTER_OTLP_ENDPOINT takes."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_url(self) -> str:
        """The OTLP/HTTP traces endpoint."""
        return f"{self.base_url}/v1/traces"

    @property
    def span_file(self) -> Path:
        """The file this collector process appends to."""
        return self.data_dir / "traces" / f"collector-{self.process.pid}.jsonl"

    def log(self) -> str:
        """Everything the collector wrote to stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(url: str, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """POSTs a body; returns (status, response body) for success and HTTP errors alike."""
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": content_type, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            return response.status == 200 and response.read() == b"ok"
    except OSError:
        return False


def _clean_env(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "AIDC_"))}
    env.update(AIDC_COLLECTOR_ADDR=f"127.0.0.1:{port}", AIDC_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    return env


@contextmanager
def running_collector(data_dir: Path) -> Iterator[CollectorProcess]:
    """Runs a collector on a free port until the block ends, then SIGTERMs it and waits for it to exit."""
    collector = _start(data_dir)
    try:
        yield collector
    finally:
        if collector.process.poll() is None:
            collector.process.send_signal(signal.SIGTERM)
            try:
                collector.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                collector.process.kill()
                collector.process.wait()


def _start(data_dir: Path) -> CollectorProcess:
    for attempt in range(3):  # another process may grab the free port between probe and bind
        port = free_port()
        log_path = data_dir / f"collector-{port}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.collector"],
                cwd=REPO_ROOT,
                env=_clean_env(data_dir, port),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            if _healthy(port):
                return CollectorProcess(process, port, data_dir, log_path)
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()
            process.wait()
        if attempt == 2 or "cannot listen" not in log_path.read_text(errors="replace"):
            raise RuntimeError(f"collector did not start:\n{log_path.read_text(errors='replace')}")
    raise AssertionError("unreachable")
