"""A real SeaweedFS S3 server for tests and benchmarks: its own temp directory, every port free and explicit,
an identity configured (without one SeaweedFS lets anyone in). Uses the platform's own command line builder."""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import urllib3
from minio import Minio

from services.mesh.config import MeshSettings
from services.platform.components import S3Credentials, resolve_platform, weed_argv, write_s3_identity_config
from services.platform.config import PlatformSettings
from tests.conftest import ROOT, free_port

__all__ = ["SeaweedFS", "weed_binary"]

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def weed_binary() -> Path:
    """The SeaweedFS binary `make install` puts in .runtime (deploy/local/install-runtime.sh)."""
    return ROOT / ".runtime" / "bin" / "weed"


@dataclass
class SeaweedFS:
    """One SeaweedFS 'mini' process (master, volume, filer, S3 gateway) on loopback."""

    directory: Path
    access_key: str = field(default_factory=lambda: "AIDCTEST" + secrets.token_hex(6).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    endpoint: str = ""
    process: subprocess.Popen[bytes] | None = None
    _argv: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        port = free_port()
        self.endpoint = f"127.0.0.1:{port}"
        ports = {name: free_port() for name in _PORT_SETTINGS}
        platform = resolve_platform(
            MeshSettings(data_dir=self.directory),
            PlatformSettings(runtime_dir=ROOT / ".runtime", s3_endpoint=self.endpoint, **ports),
            S3Credentials(self.access_key, self.secret_key),
        )
        for sub in ("data", "log"):
            (platform.s3_dir / sub).mkdir(parents=True, exist_ok=True)
        write_s3_identity_config(platform.s3_dir / "s3.json", platform.credentials)
        # Every test takes its own bucket, and SeaweedFS gives each bucket its own volumes: with the volume count
        # left to SeaweedFS (free disk / 1 GiB) a session's buckets ran out of writable volumes on a fuller disk.
        # Volumes are sparse files, so a high count costs nothing.
        self._argv = (*weed_argv(platform), "-volume.max=2000", "-master.volumeSizeLimitMB=64")
        self._log = self.directory / "weed.log"

    def start(self, timeout: float = 60.0) -> None:
        """Starts the server and waits until its S3 gateway answers."""
        if not weed_binary().exists():
            raise RuntimeError(f"{weed_binary()} missing: run `make install` (deploy/local/install-runtime.sh)")
        with self._log.open("ab") as out:
            self.process = subprocess.Popen(self._argv, cwd=self.directory, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self._log}")
            try:
                with _OPENER.open(f"http://{self.endpoint}/healthz", timeout=1) as response:
                    if response.status == 200 and self._answers_s3():
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"SeaweedFS S3 at {self.endpoint} not up after {timeout}s; see {self._log}")

    def _answers_s3(self) -> bool:
        """True once an authenticated S3 call succeeds (the gateway may answer health checks before that)."""
        client = Minio(
            self.endpoint,
            self.access_key,
            self.secret_key,
            secure=False,
            http_client=urllib3.PoolManager(timeout=2.0, retries=False),
        )
        try:
            client.list_buckets()
        except Exception:  # noqa: BLE001 - not up yet, whatever the failure
            return False
        return True

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def env(self) -> dict[str, str]:
        """The variables the platform passes every service to reach this server."""
        return {
            "AIDC_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }


_PORT_SETTINGS = (
    "seaweedfs_s3_grpc_port",
    "seaweedfs_master_port",
    "seaweedfs_master_grpc_port",
    "seaweedfs_volume_port",
    "seaweedfs_volume_grpc_port",
    "seaweedfs_filer_port",
    "seaweedfs_filer_grpc_port",
    "seaweedfs_admin_port",
    "seaweedfs_admin_grpc_port",
)
