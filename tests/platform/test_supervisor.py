"""`aidc up --detach` / `status` / `down` over the real platform: six services, Triton, SeaweedFS, collector.

Every address and port is a free one and the data directory is private, so this runs beside a developer's
own `aidc up`. Needs the runtime from `make install` (.runtime/).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
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
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from services.gen.aidc.auth.v1 import auth_service_pb2 as auth_pb
from services.gen.aidc.auth.v1 import auth_service_pb2_grpc
from services.gen.aidc.storage.v1 import storage_service_pb2 as storage_pb
from services.gen.aidc.storage.v1 import storage_service_pb2_grpc
from services.mesh.certs import init_certificates
from services.mesh.config import SERVICE_NAMES
from services.mesh.metrics import scrape
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
    *(f"AIDC_{name.upper()}_TENANT_ADDR" for name in SERVICE_NAMES),
    "AIDC_COLLECTOR_ADDR",
    "AIDC_TRITON_GRPC_ADDR",
    "AIDC_S3_ENDPOINT",
]
_PORT_NUMBERS = [
    "AIDC_PROMETHEUS_PORT",
    *(f"AIDC_{component.upper()}_METRICS_PORT" for component in ("supervisor", *SERVICE_NAMES)),
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


def platform_environment(tmp_path: Path) -> Platform:
    """What `aidc up` needs to run a platform of its own under ``tmp_path``: every port free and explicit, cheap
    password hashing; nothing inherited from the developer's AIDC_/OTEL_/AWS_ variables."""
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
        # A hung component is noticed within seconds (3 unanswered checks a second apart, each waiting 2 s).
        AIDC_HEALTH_CHECK_INTERVAL_SECONDS="1",
        AIDC_HEALTH_CHECK_TIMEOUT_SECONDS="2",
    )
    return Platform(env=env, cwd=tmp_path, data_dir=tmp_path / "data")


@pytest.fixture
def platform_env(tmp_path: Path) -> Iterator[Platform]:
    platform = platform_environment(tmp_path)
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


def triton_client(p: Platform, tls: Path | None = None) -> triton_grpc.InferenceServerClient:
    """A client of the platform's Triton with the client certificate in ``tls`` (default: the platform's own)."""
    tls = tls or p.data_dir / "triton" / "tls"
    credentials = grpc.ssl_channel_credentials(
        (tls / "ca.pem").read_bytes(), (tls / "client-key.pem").read_bytes(), (tls / "client.pem").read_bytes()
    )
    return triton_grpc.InferenceServerClient(p.address("AIDC_TRITON_GRPC_ADDR"), creds=credentials)


def load_echo_model(p: Platform) -> None:
    """Writes the echo model into the platform's live repository and has Triton load it (its python backend stub
    starts: a grandchild of the supervisor)."""
    model = p.data_dir / "model_repository" / "echo"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(ECHO_CONFIG)
    (model / "1" / "model.py").write_text(ECHO_MODEL)
    with triton_client(p) as client:
        client.load_model("echo")


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
    with triton_client(p) as triton:
        assert triton.is_server_ready()
    # Every service's /metrics (mutual TLS, the operator's certificate) counts the health checks it answered.
    for c in state.components:
        if c.name in SERVICE_NAMES:
            port = p.env[f"AIDC_{c.name.upper()}_METRICS_PORT"]
            assert c.metrics_url == f"https://127.0.0.1:{port}/metrics", c
            assert f"metrics {c.metrics_url}" in c.endpoints
            seen_metrics = scrape(c.metrics_url, p.data_dir / "certs")
            assert seen_metrics.value("grpc_server_handled_total", grpc_service="grpc.health.v1.Health") >= 1, c.name
    assert "since each component started, from its /metrics" in status.stdout
    assert http_status(f"http://{p.address('AIDC_COLLECTOR_ADDR')}/healthz") == 200
    # The object store has an identity configured, so anonymous requests are refused.
    assert http_status(f"http://{p.address('AIDC_S3_ENDPOINT')}/") == 403

    # A model in Triton's live repository gives it a python backend stub: a grandchild that must die with it.
    load_echo_model(p)
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

    # Auth hangs (SIGSTOP: alive, answering nothing). Its clients get an error within their deadline, never a hang:
    # directly, and through storage, which must ask auth before it answers. The supervisor notices, kills and
    # restarts it; then the same calls work again.
    password = re.search(r"password:\s+(\S+)", up.stdout)
    assert password is not None, up.stdout
    certs = p.data_dir / "certs"
    credentials = grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(), (certs / "cli-key.pem").read_bytes(), (certs / "cli.pem").read_bytes()
    )
    with (
        grpc.secure_channel(p.address("AIDC_AUTH_ADDR"), credentials) as auth_channel,
        grpc.secure_channel(p.address("AIDC_STORAGE_ADDR"), credentials) as storage_channel,
    ):
        auth = auth_service_pb2_grpc.AuthServiceStub(auth_channel)
        storage_stub = storage_service_pb2_grpc.StorageServiceStub(storage_channel)
        login = auth_pb.LoginRequest(tenant="platform", name="admin", password=password.group(1))
        token = auth.Login(login, timeout=30).tokens.access_token
        bearer = (("authorization", f"Bearer {token}"),)
        hung = next(c for c in p.state().components if c.name == "auth")
        assert hung.pid is not None
        os.kill(hung.pid, signal.SIGSTOP)
        try:
            for call, deadline in (
                (lambda timeout: auth.WhoAmI(auth_pb.WhoAmIRequest(), metadata=bearer, timeout=timeout), 3.0),
                # Never asked before, so storage has no cached decision: it must ask the hung auth.
                (
                    lambda timeout: storage_stub.ListDatasets(
                        storage_pb.ListDatasetsRequest(tenant="fresh"), metadata=bearer, timeout=timeout
                    ),
                    8.0,
                ),
            ):
                began = time.monotonic()
                with pytest.raises(grpc.RpcError) as failed:
                    call(deadline)
                took = time.monotonic() - began
                assert failed.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
                assert took < deadline + 1.0, (failed.value, took)

            def auth_back() -> bool:
                now = next(c for c in p.state().components if c.name == "auth")
                return now.hung_restarts == 1 and now.status == "running" and now.pid not in (None, hung.pid)

            eventually(auth_back, timeout=90, why=p.diagnostics)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung.pid, signal.SIGCONT)  # if the test failed before the supervisor killed it
        restarted_auth = next(c for c in p.state().components if c.name == "auth")
        assert restarted_auth.last_restart.startswith("hung: 3 health checks unanswered"), restarted_auth
        assert restarted_auth.process is not None
        seen.append(restarted_auth.process)
        eventually(lambda: _works(lambda: auth.WhoAmI(auth_pb.WhoAmIRequest(), metadata=bearer, timeout=5)), 30)
        eventually(
            lambda: _works(
                lambda: storage_stub.ListDatasets(
                    storage_pb.ListDatasetsRequest(tenant="fresh"), metadata=bearer, timeout=5
                )
            ),
            30,
        )
    status = p.cli("status")
    assert "auth last restarted: hung: 3 health checks unanswered" in status.stdout, p.diagnostics(status)
    assert "1 hung" in status.stdout, status.stdout
    supervisor_metrics = scrape(p.state().metrics_url, certs)
    assert supervisor_metrics.value("aidc_component_restarts_total", component="auth", reason="hung") == 1
    assert supervisor_metrics.value("aidc_component_restarts_total", component="storage", reason="exit") == 1

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


def _works(call: Callable[[], object]) -> bool:
    try:
        call()
    except grpc.RpcError:
        return False
    return True


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


#: Secrets the platform's own processes may hold, and that Triton must not (it runs tenants' TorchScript).
PLATFORM_SECRETS = {
    "AIDC_AUTH_MASTER_KEY": "bWFzdGVyLWtleS1vZi1hdXRoLS0tLS0tLS0tLS0tLS0=",
    "AIDC_STORAGE_MASTER_KEY": "bWFzdGVyLWtleS1vZi1zdG9yYWdlLS0tLS0tLS0tLS0=",
    "AIDC_DATABASE_URL": "postgresql+psycopg://aidc:db-password-123@127.0.0.1:1/aidc_{service}",
    "PGPASSWORD": "db-password-123",
    "AWS_ACCESS_KEY_ID": "AIDCTESTACCESSKEY",
    "AWS_SECRET_ACCESS_KEY": "s3-secret-key-456",
}


def _listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (from /proc: its socket inodes in the LISTEN table)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def private_modes(root: Path) -> list[str]:
    """What under ``root`` is not private: directories other than 0700, files other than 0600."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink() or path.is_socket():
            continue
        if (path.is_dir() and mode != 0o700) or (path.is_file() and mode != 0o600):
            wrong.append(f"{oct(mode)} {path.relative_to(root)}")
    return wrong


def test_triton_holds_no_platform_secret_and_admits_only_the_platform(platform_env: Platform, tmp_path: Path) -> None:
    """Issue 11 items 1, 9 and 11 on the Triton `aidc up` starts: its environment (and its python backend stubs')
    holds none of the platform's secrets, its working directory is not the data directory, its gRPC endpoint admits
    only the platform's client certificate (no plaintext, no other certificate, no HTTP endpoint, no metrics port),
    and what the supervisor creates is private."""
    p = platform_env
    p.env.update(PLATFORM_SECRETS, AIDC_PLATFORM_COMPONENTS="triton")
    up = p.cli("up", "--detach")
    assert up.returncode == 0, p.diagnostics(up)
    triton = next(c for c in p.state().components if c.name == "triton")
    assert triton.pid is not None and triton.session is not None

    assert private_modes(p.data_dir) == []
    tls = p.data_dir / "triton" / "tls"
    assert not (tls / "ca-key.pem").exists()  # no other client certificate can ever be issued for this Triton

    # Model code runs in Triton and in its python backend stubs: none of them holds a secret.
    load_echo_model(p)
    members = session_members(triton.session)
    assert len(members) >= 2, members  # tritonserver and the echo model's stub
    for pid in members:
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        for name, value in PLATFORM_SECRETS.items():
            assert value not in environ and f"{name}=" not in environ, (pid, name)
        assert not [v for v in environ.split("\0") if v.startswith(("AIDC_", "PG", "AWS_", "OTEL_"))], pid
        assert "PGPASSWORD" not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    cwd = Path(os.readlink(f"/proc/{triton.pid}/cwd"))
    assert cwd == p.data_dir / "triton" and cwd != p.data_dir
    assert sorted(child.name for child in cwd.iterdir()) == ["tls"]

    # Only the gRPC port listens, and only the platform's client certificate gets through it.
    grpc_port = int(p.address("AIDC_TRITON_GRPC_ADDR").rsplit(":", 1)[1])
    assert _listening_ports(triton.pid) == {grpc_port}
    with triton_grpc.InferenceServerClient(p.address("AIDC_TRITON_GRPC_ADDR")) as plaintext:
        with pytest.raises(InferenceServerException):
            plaintext.load_model("echo")
    foreign = tmp_path / "foreign"
    init_certificates(foreign, services=(), clients=("client",))
    for certs in (foreign, None):
        credentials = grpc.ssl_channel_credentials(
            (tls / "ca.pem").read_bytes(),
            None if certs is None else (certs / "client-key.pem").read_bytes(),
            None if certs is None else (certs / "client.pem").read_bytes(),
        )
        with triton_grpc.InferenceServerClient(p.address("AIDC_TRITON_GRPC_ADDR"), creds=credentials) as stranger:
            with pytest.raises(InferenceServerException):
                stranger.unload_model("echo")
    with triton_client(p) as client:
        assert client.is_model_ready("echo")

    down = p.cli("down")
    assert down.returncode == 0, p.diagnostics(down)
