"""`aidc up --detach` / `status` / `down` over the real platform: six services, Triton, SeaweedFS, collector.

Every address and port is a free one and the data directory is private, so this runs beside a developer's
own `aidc up`. Needs the runtime from `make install` (.runtime/).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.mesh.config import SERVICE_NAMES
from services.platform.config import ALL_COMPONENTS
from services.platform.process import ProcessId, is_running, process_id, session_members
from services.platform.state import PlatformState, read_state
from services.platform.supervisor import log_tail

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / ".runtime"
# The CLI's platform commands on a throwaway app, so this test doesn't depend on the rest of the CLI.
CLI = "import typer; from services.cli.platform_cmd import register; app = typer.Typer(); register(app); app()"

_PORT_VARIABLES = [
    *(f"AIDC_{name.upper()}_ADDR" for name in SERVICE_NAMES),
    "AIDC_COLLECTOR_ADDR",
    "AIDC_TRITON_GRPC_ADDR",
    "AIDC_TRITON_HTTP_ADDR",
    "AIDC_S3_ENDPOINT",
]
_PORT_NUMBERS = [
    "AIDC_TRITON_METRICS_PORT",
    *(
        f"AIDC_SEAWEEDFS_{listener}_PORT"
        for listener in (
            "S3_GRPC",
            "MASTER",
            "MASTER_GRPC",
            "VOLUME",
            "VOLUME_GRPC",
            "FILER",
            "FILER_GRPC",
            "ADMIN",
            "ADMIN_GRPC",
        )
    ),
]

ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
ECHO_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        outputs = [pb_utils.get_input_tensor_by_name(r, "X").as_numpy() for r in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", x)]) for x in outputs]
"""


def free_ports(count: int) -> list[int]:
    """Distinct free ports: all sockets stay bound until every port is chosen."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


@dataclass
class Platform:
    env: dict[str, str]
    cwd: Path
    data_dir: Path

    def cli(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", CLI, *args],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def state(self) -> PlatformState:
        state = read_state(self.data_dir / "run")
        assert state is not None
        return state

    def address(self, variable: str) -> str:
        return self.env[variable]

    def diagnostics(self, *outputs: subprocess.CompletedProcess[str]) -> str:
        """What to read when an assertion fails: command outputs and the end of the supervisor's log."""
        shown = "\n".join(out.stdout + out.stderr for out in outputs)
        return f"{shown}\n--- supervisor.log:\n{log_tail(self.data_dir / 'logs' / 'supervisor.log', 40)}"


@pytest.fixture
def platform_env(tmp_path: Path) -> Iterator[Platform]:
    if not (RUNTIME / "bin" / "weed").exists() or not (RUNTIME / "pytriton").exists():
        pytest.fail(f"the runtime is not installed in {RUNTIME}: run `make install`")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIDC_", "OTEL_", "AWS_"))}
    ports = free_ports(len(_PORT_VARIABLES) + len(_PORT_NUMBERS))
    env.update({name: f"127.0.0.1:{port}" for name, port in zip(_PORT_VARIABLES, ports, strict=False)})
    env.update({name: str(port) for name, port in zip(_PORT_NUMBERS, ports[len(_PORT_VARIABLES) :], strict=True)})
    env.update(
        PYTHONPATH=str(ROOT),
        AIDC_DATA_DIR=str(tmp_path / "data"),
        AIDC_RUNTIME_DIR=str(RUNTIME),
        AIDC_STOP_GRACE_SECONDS="10",
        # Cheap password hashing for the auth service (tests only).
        AIDC_AUTH_ARGON2_TIME_COST="1",
        AIDC_AUTH_ARGON2_MEMORY_KIB="1024",
    )
    platform = Platform(env=env, cwd=tmp_path, data_dir=tmp_path / "data")
    yield platform
    # Whatever happened above, leave nothing running.
    platform.cli("down", timeout=120)


def eventually(
    check: Callable[[], bool], timeout: float = 60.0, interval: float = 0.2, why: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"condition not met in {timeout:.0f}s\n{why()}"
        time.sleep(interval)


def grpc_serving(address: str, certs: Path) -> bool:
    """Health over mutual TLS with the CLI's certificate (aidc up turns mTLS on); plaintext must be refused."""
    with grpc.insecure_channel(address) as plaintext:
        try:
            health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return False
        except grpc.RpcError:
            pass
    credentials = grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(), (certs / "cli-key.pem").read_bytes(), (certs / "cli.pem").read_bytes()
    )
    with grpc.secure_channel(address, credentials) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def http_status(url: str, method: str = "GET") -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_up_status_restart_down(platform_env: Platform) -> None:
    p = platform_env
    began = time.monotonic()
    up = p.cli("up", "--detach")
    assert up.returncode == 0, p.diagnostics(up)
    assert time.monotonic() - began < 120
    assert "platform admin created; this password is shown once" in up.stdout
    assert not (p.data_dir / "auth" / "bootstrap-admin.json").exists()
    # The one-time password on disk expired at its first use, the CLI's login, which set the one shown.
    assert "the CLI is logged in as platform/admin" in up.stdout

    state = p.state()
    assert state.status == "serving"
    assert [c.name for c in state.components] == list(ALL_COMPONENTS)
    seen: list[ProcessId] = [state.supervisor]
    for c in state.components:
        assert c.process is not None and is_running(c.process), c.name
        seen.append(c.process)
        assert (p.data_dir / "logs" / f"{c.name}.log").exists()

    status = p.cli("status")
    assert status.returncode == 0, p.diagnostics(status)
    for c in state.components:
        assert any(c.name in line and "SERVING" in line and c.address in line for line in status.stdout.splitlines())
    # The same answers, asked directly: gRPC health of every service, HTTP of the rest.
    for service in SERVICE_NAMES:
        assert grpc_serving(p.address(f"AIDC_{service.upper()}_ADDR"), p.data_dir / "certs"), service
    assert http_status(f"http://{p.address('AIDC_TRITON_HTTP_ADDR')}/v2/health/ready") == 200
    assert http_status(f"http://{p.address('AIDC_COLLECTOR_ADDR')}/healthz") == 200
    # The object store has an identity configured, so anonymous requests are refused.
    assert http_status(f"http://{p.address('AIDC_S3_ENDPOINT')}/") == 403

    # A model in Triton's live repository gives it a python backend stub: a grandchild that must die with it.
    model = p.data_dir / "model_repository" / "echo"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(ECHO_CONFIG)
    (model / "1" / "model.py").write_text(ECHO_MODEL)
    load = f"http://{p.address('AIDC_TRITON_HTTP_ADDR')}/v2/repository/models/echo/load"
    assert http_status(load, method="POST") == 200
    triton = next(c for c in state.components if c.name == "triton")
    assert triton.session is not None
    stubs = [pid for pid in session_members(triton.session) if pid != triton.pid]
    assert stubs, "no python backend stub in Triton's session"
    seen += [ident for ident in map(process_id, stubs) if ident is not None]

    again = p.cli("up", "--detach")
    assert again.returncode == 0 and "already running" in again.stdout, p.diagnostics(again)

    storage = next(c for c in state.components if c.name == "storage")
    assert storage.pid is not None
    os.kill(storage.pid, signal.SIGKILL)

    def storage_back() -> bool:
        now = next(c for c in p.state().components if c.name == "storage")
        return now.restarts == 1 and now.status == "running" and now.pid not in (None, storage.pid)

    eventually(storage_back, why=p.diagnostics)
    restarted = next(c for c in p.state().components if c.name == "storage")
    assert restarted.process is not None
    seen.append(restarted.process)
    assert grpc_serving(p.address("AIDC_STORAGE_ADDR"), p.data_dir / "certs")
    # Services whose readiness follows their dependencies may take a moment to see storage back.
    eventually(lambda: p.cli("status").returncode == 0, timeout=30, why=lambda: p.diagnostics(p.cli("status")))

    down = p.cli("down")
    assert down.returncode == 0, p.diagnostics(down)
    assert "killed leftover" not in down.stdout, p.diagnostics(down)  # the supervisor stopped everything itself
    left = [ident.pid for ident in seen if is_running(ident)]
    assert left == [], f"still running after down: {left}\n{p.diagnostics(down)}"
    for c in state.components:
        assert c.session is not None and session_members(c.session) == [], c.name
    assert not (p.data_dir / "run" / "state.json").exists()
    assert p.cli("status").returncode == 1
    assert p.cli("down").returncode == 0  # idempotent


def test_down_after_the_supervisor_was_killed(platform_env: Platform) -> None:
    p = platform_env
    p.env["AIDC_PLATFORM_COMPONENTS"] = "collector,s3"
    up = p.cli("up", "--detach")
    assert up.returncode == 0, p.diagnostics(up)
    state = p.state()
    os.kill(state.supervisor_pid, signal.SIGKILL)
    eventually(lambda: not is_running(state.supervisor), timeout=10)
    orphans = [c.process for c in state.components]
    assert all(ident is not None and is_running(ident) for ident in orphans)

    down = p.cli("down")
    assert down.returncode == 0, p.diagnostics(down)
    assert "killed leftover collector" in down.stdout and "killed leftover s3" in down.stdout
    assert not any(ident is not None and is_running(ident) for ident in orphans)
    for c in state.components:
        assert c.session is not None and session_members(c.session) == []
