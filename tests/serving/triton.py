"""A real tritonserver process for tests: the same argv and environment as `aidc up` builds (explicit model
control, the python backend running in this venv), on free ports and a private model repository."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import tritonclient.grpc as triton_grpc

from services.mesh.config import MeshSettings, load_settings
from services.platform.components import S3Credentials, build_components, resolve_platform
from services.platform.config import PlatformSettings
from tests.conftest import free_port

__all__ = ["TritonProcess"]

ROOT = Path(__file__).resolve().parents[2]


class TritonProcess:
    """tritonserver on ``repository``; exports its trace spans to ``collector_addr`` when one is given."""

    def __init__(self, repository: Path, work_dir: Path, collector_addr: str | None = None) -> None:
        self.repository = repository
        self.work_dir = work_dir
        self.grpc_addr = f"127.0.0.1:{free_port()}"
        self.http_addr = f"127.0.0.1:{free_port()}"
        self.log_file = work_dir / "triton.log"
        environ = {
            "AIDC_DATA_DIR": str(work_dir),
            "AIDC_RUNTIME_DIR": str(ROOT / ".runtime"),
            "AIDC_PLATFORM_COMPONENTS": "triton",
            "AIDC_MODEL_REPOSITORY": str(repository),
            "AIDC_TRITON_GRPC_ADDR": self.grpc_addr,
            "AIDC_TRITON_HTTP_ADDR": self.http_addr,
            "AIDC_TRITON_METRICS_PORT": str(free_port()),
            "AIDC_COLLECTOR_ADDR": collector_addr or f"127.0.0.1:{free_port()}",
            "AIDC_STOP_GRACE_SECONDS": "6",
        }
        platform = resolve_platform(
            load_settings(MeshSettings, environ),
            load_settings(PlatformSettings, environ),
            S3Credentials("unused", "unused"),
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AIDC_", "OTEL_"))}
        (spec,) = build_components(platform, base)
        self.argv = list(spec.argv)
        self.env = dict(spec.env)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.repository.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, cwd=self.work_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with triton_grpc.InferenceServerClient(self.grpc_addr) as client:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with {self.process.returncode}: see {self.log_file}")
                try:
                    if client.is_server_ready(client_timeout=1.0):
                        return
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"tritonserver not ready after {timeout}s: see {self.log_file}")

    def client(self) -> triton_grpc.InferenceServerClient:
        """A plain tritonclient straight to Triton (what the gateway is compared with)."""
        return triton_grpc.InferenceServerClient(self.grpc_addr)

    def kill(self) -> None:
        """SIGKILL to the whole process group (the python backend stubs included), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()
        try:  # stubs left behind by a stopped server
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
