"""Component specs built from settings: Triton's and SeaweedFS's argv, child environments, S3 credentials."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from services.mesh.config import SERVICE_NAMES, MeshSettings, load_settings
from services.platform.components import (
    Platform,
    ProbeSpec,
    S3Credentials,
    build_components,
    ensure_s3_credentials,
    prepare_data_dir,
    resolve_platform,
    settings_env,
    triton_argv,
    weed_argv,
)
from services.platform.config import ALL_COMPONENTS, PlatformSettings

CREDENTIALS = S3Credentials("AKIDTEST", "secret-test")


def make_platform(tmp_path: Path, **env: str) -> Platform:
    environ = {"AIDC_DATA_DIR": str(tmp_path / "data"), "AIDC_RUNTIME_DIR": str(tmp_path / "rt"), **env}
    return resolve_platform(load_settings(MeshSettings, environ), load_settings(PlatformSettings, environ), CREDENTIALS)


def flag(argv: tuple[str, ...], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {argv}"
    return values[0]


def trace_configs(argv: tuple[str, ...]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--trace-config"]


def test_triton_argv_follows_settings(tmp_path: Path) -> None:
    platform = make_platform(
        tmp_path,
        AIDC_TRITON_GRPC_ADDR="127.0.0.1:41001",
        AIDC_TRITON_METRICS_PORT="41003",
        AIDC_COLLECTOR_ADDR="127.0.0.1:41004",
    )
    argv = triton_argv(platform)
    assert argv[0] == str(tmp_path / "rt" / "pytriton" / "tritonserver" / "bin" / "tritonserver")
    assert flag(argv, "--model-repository") == str(tmp_path / "data" / "model_repository")
    assert flag(argv, "--backend-directory") == str(tmp_path / "rt" / "pytriton" / "tritonserver" / "backends")
    assert flag(argv, "--model-control-mode") == "explicit"
    assert "--disable-auto-complete-config" in argv
    assert "--strict-readiness=false" in argv  # one tenant's model loading or broken leaves Triton ready
    assert (flag(argv, "--grpc-address"), flag(argv, "--grpc-port")) == ("127.0.0.1", "41001")
    # Only the platform reaches Triton: mutual TLS with Triton's own CA on gRPC, no HTTP endpoint (it has no TLS).
    tls = tmp_path / "data" / "triton" / "tls"
    assert (flag(argv, "--grpc-use-ssl"), flag(argv, "--grpc-use-ssl-mutual")) == ("true", "true")
    assert flag(argv, "--grpc-root-cert") == str(tls / "ca.pem")
    assert (flag(argv, "--grpc-server-cert"), flag(argv, "--grpc-server-key")) == (
        str(tls / "triton.pem"),
        str(tls / "triton-key.pem"),
    )
    assert flag(argv, "--allow-http") == "false"
    assert (flag(argv, "--metrics-address"), flag(argv, "--metrics-port")) == ("127.0.0.1", "41003")
    assert flag(triton_argv(make_platform(tmp_path)), "--allow-metrics") == "false"  # metrics are off by default
    assert flag(argv, "--pinned-memory-pool-byte-size") == "0"
    assert flag(argv, "--cuda-memory-pool-byte-size") == "0:0"
    assert flag(argv, "--allow-gpu-metrics") == "false"
    assert trace_configs(argv) == [
        "mode=opentelemetry",
        "level=TIMESTAMPS",
        "rate=1",
        "opentelemetry,url=http://127.0.0.1:41004/v1/traces",
        "opentelemetry,resource=service.name=triton",
        "opentelemetry,bsp_schedule_delay=500",
    ]
    # Triton must give up on in-flight requests before the supervisor's SIGKILL.
    assert 0 < int(flag(argv, "--exit-timeout-secs")) < platform.platform.stop_grace_seconds


def test_triton_trace_rate_samples(tmp_path: Path) -> None:
    assert "rate=20" in trace_configs(triton_argv(make_platform(tmp_path, AIDC_TRITON_TRACE_RATE="20")))
    with pytest.raises(ValueError, match="AIDC_TRITON_TRACE_RATE"):
        make_platform(tmp_path, AIDC_TRITON_TRACE_RATE="0")


def test_model_repository_override(tmp_path: Path) -> None:
    platform = make_platform(tmp_path, AIDC_MODEL_REPOSITORY=str(tmp_path / "repo"))
    assert flag(triton_argv(platform), "--model-repository") == str(tmp_path / "repo")


def test_weed_argv_pins_every_port_and_file(tmp_path: Path) -> None:
    platform = make_platform(tmp_path, AIDC_S3_ENDPOINT="127.0.0.1:42000")
    argv = weed_argv(platform)
    s3 = tmp_path / "data" / "s3"
    assert argv[0] == str(tmp_path / "rt" / "bin" / "weed")
    assert argv[2] == "mini"
    assert flag(argv, "-logdir") == str(s3 / "log")
    assert flag(argv, "-dir") == str(s3 / "data")
    assert flag(argv, "-s3.config") == str(s3 / "s3.json")
    assert flag(argv, "-ip") == flag(argv, "-ip.bind") == "127.0.0.1"
    assert flag(argv, "-s3.port") == "42000"
    for disabled in ("-master.telemetry", "-admin.ui", "-webdav"):
        assert flag(argv, disabled) == "false"
    assert flag(argv, "-s3.port.iceberg") == flag(argv, "-s3.port.lance") == "0"
    # weed silently moves a listener whose default port is busy: every listener it opens must be pinned.
    for listener in ("s3", "master", "volume", "filer", "admin"):
        assert int(flag(argv, f"-{listener}.port")) > 0
        assert int(flag(argv, f"-{listener}.port.grpc")) > 0
    for socket_flag in ("-s3.localSocket", "-filer.localSocket"):
        assert not flag(argv, socket_flag).startswith("/tmp/seaweedfs")


def test_every_listener_in_argv_and_distinct(tmp_path: Path) -> None:
    platform = make_platform(tmp_path)
    specs = build_components(platform, {"PATH": "/usr/bin"})
    listens = [address for spec in specs for address in spec.listens]
    assert len(listens) == len(set(listens)), "two components share a port"
    for spec in specs:
        if spec.name in ("s3", "triton"):
            joined = " ".join(spec.argv)
            for address in spec.listens:
                assert address.rsplit(":", 1)[1] in joined, f"{spec.name} listens on {address} not in argv"


def test_components_in_start_order_with_probes(tmp_path: Path) -> None:
    platform = make_platform(tmp_path, AIDC_BILLING_ADDR="127.0.0.1:43005")
    specs = build_components(platform, {"PATH": "/usr/bin"})
    assert [s.name for s in specs] == list(ALL_COMPONENTS)
    by_name = {s.name: s for s in specs}
    assert by_name["collector"].probe.target == "http://127.0.0.1:50060/healthz"
    assert by_name["s3"].probe.target == "http://127.0.0.1:50070/healthz"
    assert by_name["triton"].probe == ProbeSpec("grpc", "127.0.0.1:50061", str(tmp_path / "data" / "triton" / "tls"))
    assert (by_name["billing"].probe.kind, by_name["billing"].probe.target) == ("grpc", "127.0.0.1:43005")
    for name in SERVICE_NAMES:
        spec = by_name[name]
        assert spec.argv == (sys.executable, "-m", f"services.{name}")
        assert spec.log_file == tmp_path / "data" / "logs" / f"{name}.log"
        assert spec.start_stage > by_name["triton"].start_stage
        assert spec.stop_stage < by_name["triton"].stop_stage < by_name["collector"].stop_stage


def test_child_environment(tmp_path: Path) -> None:
    platform = make_platform(tmp_path)
    specs = {s.name: s for s in build_components(platform, {"PATH": "/usr/bin", "KEEP": "me"})}
    storage = specs["storage"].env
    assert storage["KEEP"] == "me"
    assert storage["AIDC_DATA_DIR"] == str(tmp_path / "data")
    assert storage["AIDC_S3_ENDPOINT"] == "127.0.0.1:50070"
    assert (storage["AWS_ACCESS_KEY_ID"], storage["AWS_SECRET_ACCESS_KEY"]) == ("AKIDTEST", "secret-test")
    assert storage["AIDC_TRITON_GRPC_ADDR"] == "127.0.0.1:50061"
    assert storage["AIDC_MODEL_REPOSITORY"] == str(tmp_path / "data" / "model_repository")
    assert storage["AIDC_TRITON_TLS_DIR"] == str(tmp_path / "data" / "triton" / "tls")
    triton = specs["triton"].env
    # The python backend stub must find this venv's python (torch, numpy<2) first.
    assert triton["PATH"].split(":")[0] == str(Path(sys.prefix) / "bin")
    assert triton["TORCH_NUM_THREADS"] == "1"
    assert specs["triton"].cwd == tmp_path / "data" / "triton"


def test_triton_environment_holds_no_platform_secret(tmp_path: Path) -> None:
    """Triton runs tenants' TorchScript and python-backend model code: only locale, paths and the GPU runtime's
    variables reach it, and AWS_* only when it reads its model repository from S3 (which needs them)."""
    base = {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "CUDA_VISIBLE_DEVICES": "0",
        "AIDC_AUTH_MASTER_KEY": "a2V5",
        "AIDC_STORAGE_MASTER_KEY": "a2V5",
        "AIDC_DATABASE_URL": "postgresql+psycopg://u:pw@db/aidc_{service}",
        "PGPASSWORD": "pw",
        "AWS_SESSION_TOKEN": "token",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer x",
        "GITHUB_TOKEN": "ghp_x",
    }
    local = {s.name: s for s in build_components(make_platform(tmp_path), base)}["triton"].env
    assert set(local) == {"PATH", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "TORCH_NUM_THREADS", "PYTHONUNBUFFERED"}
    s3 = make_platform(tmp_path, AIDC_MODEL_REPOSITORY="s3://127.0.0.1:50070/models/repo")
    remote = {s.name: s for s in build_components(s3, base)}["triton"].env
    assert (remote["AWS_ACCESS_KEY_ID"], remote["AWS_SECRET_ACCESS_KEY"]) == ("AKIDTEST", "secret-test")
    assert not {k for k in remote if k.startswith(("AIDC_", "PG", "OTEL_")) and not k.startswith("AIDC_STORAGE_S3")}
    assert "AWS_SESSION_TOKEN" not in remote and "GITHUB_TOKEN" not in remote


def test_component_selection(tmp_path: Path) -> None:
    platform = make_platform(tmp_path, AIDC_PLATFORM_COMPONENTS="triton,s3")
    assert [s.name for s in build_components(platform, {})] == ["s3", "triton"]


def test_settings_env_round_trips(tmp_path: Path) -> None:
    platform = make_platform(tmp_path, AIDC_PLATFORM_COMPONENTS="s3,auth", AIDC_SEAWEEDFS_FILER_PORT="45000")
    assert load_settings(PlatformSettings, settings_env(platform.platform)) == platform.platform
    assert load_settings(MeshSettings, settings_env(platform.mesh)) == platform.mesh


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AIDC_PLATFORM_COMPONENTS": "auth,mongodb"}, "AIDC_PLATFORM_COMPONENTS"),
        ({"AWS_ACCESS_KEY_ID": "only-the-key"}, "AWS_SECRET_ACCESS_KEY"),
        ({"AIDC_TRITON_GRPC_ADDR": "50061"}, "AIDC_TRITON_GRPC_ADDR"),
        ({"AIDC_TRITON_METRICS_PORT": "-1"}, "AIDC_TRITON_METRICS_PORT"),
        ({"AIDC_SEAWEEDFS_MASTER_PORT": "70000"}, "AIDC_SEAWEEDFS_MASTER_PORT"),
        ({"AIDC_RESTART_BACKOFF_SECONDS": "0"}, "AIDC_RESTART_BACKOFF_SECONDS"),
        ({"AIDC_RAY_PORT": "0"}, "AIDC_RAY_PORT"),
        ({"AIDC_RAY_CPUS": "-1"}, "AIDC_RAY_CPUS"),
    ],
)
def test_bad_settings_fail_fast(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_settings(PlatformSettings, env)


def test_generated_credentials_persist_private_and_are_reused(tmp_path: Path) -> None:
    settings = load_settings(PlatformSettings, {})
    first = ensure_s3_credentials(settings, tmp_path)
    path = tmp_path / "s3" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first.access_key_id) >= 16 and len(first.secret_access_key) >= 32
    assert json.loads(path.read_text()) == {
        "access_key_id": first.access_key_id,
        "secret_access_key": first.secret_access_key,
    }
    assert ensure_s3_credentials(settings, tmp_path) == first
    assert ensure_s3_credentials(settings, tmp_path / "other") != first


def test_aws_variables_win_and_are_not_written(tmp_path: Path) -> None:
    settings = load_settings(PlatformSettings, {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"})
    assert ensure_s3_credentials(settings, tmp_path) == S3Credentials("AK", "SK")
    assert not (tmp_path / "s3" / "credentials.json").exists()


def test_prepare_data_dir_writes_private_identity(tmp_path: Path) -> None:
    platform = make_platform(tmp_path)
    prepare_data_dir(platform)
    identity = tmp_path / "data" / "s3" / "s3.json"
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    config = json.loads(identity.read_text())
    (only,) = config["identities"]
    assert only["credentials"] == [{"accessKey": "AKIDTEST", "secretKey": "secret-test"}]
    assert "Admin" in only["actions"]
    for directory in ("", "logs", "run", "model_repository", "s3/data", "triton", "triton/tls"):
        assert stat.S_IMODE((tmp_path / "data" / directory).stat().st_mode) == 0o700, directory
    tls = tmp_path / "data" / "triton" / "tls"
    assert sorted(p.name for p in tls.iterdir()) == [
        "ca.pem",
        "client-key.pem",
        "client.pem",
        "triton-key.pem",
        "triton.pem",
    ]
