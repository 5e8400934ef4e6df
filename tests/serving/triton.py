"""A real tritonserver process for tests: the same argv, environment, working directory and TLS files as `aidc up`
builds (explicit model control, the python backend running in this venv, mutual TLS on gRPC), on free ports and a
private model repository. With ``access_key`` it runs as on a cluster instead: plaintext gRPC, every protocol but
health restricted to callers sending that secret (the flags of deploy/k8s/base/triton.yaml)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import tritonclient.grpc as triton_grpc

from services.mesh.config import MeshSettings, load_settings
from services.mesh.files import private_dir
from services.platform.components import S3Credentials, build_components, resolve_platform, write_triton_tls
from services.platform.config import PlatformSettings
from services.serving.triton import TritonAccess, restricted_protocol_flags
from tests.conftest import free_port

__all__ = ["TritonProcess"]

ROOT = Path(__file__).resolve().parents[2]


class TritonProcess:
    """tritonserver on ``repository``; exports its trace spans to ``collector_addr`` when one is given."""

    def __init__(
        self, repository: Path, work_dir: Path, collector_addr: str | None = None, access_key: str = ""
    ) -> None:
        self.repository = repository
        self.work_dir = work_dir
        self.grpc_addr = f"127.0.0.1:{free_port()}"
        self.log_file = work_dir / "triton.log"
        self.access_key = access_key
        environ = {
            "AIDC_DATA_DIR": str(work_dir),
            "AIDC_RUNTIME_DIR": str(ROOT / ".runtime"),
            "AIDC_PLATFORM_COMPONENTS": "triton",
            "AIDC_MODEL_REPOSITORY": str(repository),
            "AIDC_TRITON_GRPC_ADDR": self.grpc_addr,
            "AIDC_COLLECTOR_ADDR": collector_addr or f"127.0.0.1:{free_port()}",
            "AIDC_STOP_GRACE_SECONDS": "6",
        }
        self.platform = resolve_platform(
            load_settings(MeshSettings, environ),
            load_settings(PlatformSettings, environ),
            S3Credentials("unused", "unused"),
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AIDC_", "OTEL_"))}
        (spec,) = build_components(self.platform, base)
        self.argv = list(spec.argv)
        if access_key:
            self.argv = [a for a in self.argv if not a.startswith("--grpc-use-ssl") and "-cert=" not in a]
            self.argv = [a for a in self.argv if not a.startswith("--grpc-server-key=")]
            self.argv += restricted_protocol_flags(access_key)
        self.env = dict(spec.env)
        self.cwd = spec.cwd
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def tls_dir(self) -> Path | None:
        """The client's TLS files (AIDC_TRITON_TLS_DIR); None for a cluster-style Triton."""
        return None if self.access_key else self.platform.triton_tls_dir

    @property
    def access(self) -> TritonAccess:
        """How the serving service reaches this Triton."""
        return TritonAccess(self.grpc_addr, self.tls_dir, self.access_key)

    def serving_env(self) -> dict[str, str]:
        """The serving service's settings for this Triton."""
        env = {"AIDC_TRITON_GRPC_ADDR": self.grpc_addr, "AIDC_TRITON_TLS_DIR": str(self.tls_dir or "")}
        if self.access_key:
            key_file = self.work_dir / "access-key"
            key_file.write_text(self.access_key)
            env["AIDC_TRITON_ACCESS_KEY_FILE"] = str(key_file)
        return env

    def start(self, timeout: float = 60.0) -> None:
        self.repository.mkdir(parents=True, exist_ok=True)
        private_dir(self.cwd)
        if self.tls_dir is not None and not (self.tls_dir / "ca.pem").exists():
            write_triton_tls(self.platform)  # once: a restarted Triton keeps its certificates, as under aidc up
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as client:
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
        """A tritonclient straight to Triton, with the platform's credentials (what the gateway is compared with);
        on a cluster-style Triton pass ``headers=self.headers`` to calls other than health."""
        return triton_grpc.InferenceServerClient(self.grpc_addr, creds=self.access.credentials())

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.access.metadata)

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
