"""What `aidc up` runs: one ComponentSpec per process (argv, env, log, readiness probe), from settings."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import string
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.mesh.certs import init_certificates, issue_service_certificate
from services.mesh.config import SERVICE_NAMES, MeshSettings, describe_settings, parse_address
from services.mesh.files import private_dir, write_private
from services.platform.config import PlatformSettings
from services.platform.paths import socket_path
from services.platform.ray_head import (
    RAY_MONITOR_PORT,
    RAY_PORT_OFFSETS,
    prepare_ray,
    ray_address,
    ray_auth_environment,
    ray_head_argv,
    ray_ports,
    ray_share,
)

__all__ = [
    "ProbeSpec",
    "TRITON_CLIENT_FILES",
    "ComponentSpec",
    "S3Credentials",
    "Platform",
    "resolve_platform",
    "ensure_s3_credentials",
    "write_s3_identity_config",
    "prepare_data_dir",
    "write_triton_tls",
    "build_components",
    "settings_env",
    "triton_argv",
    "weed_argv",
    "MONITORING_IDENTITIES",
    "metrics_url",
    "prometheus_argv",
    "write_prometheus_config",
]

logger = logging.getLogger(__name__)

ProbeKind = Literal["grpc", "http", "tcp"]

#: Start stage: the runtime (collector, object store, Triton) must be ready before the services start.
_RUNTIME_STAGE = 0
_SERVICE_STAGE = 1
#: Files of Triton's TLS directory a client of it uses (AIDC_TRITON_TLS_DIR; serving.triton.TLS_FILES).
TRITON_CLIENT_FILES = ("ca.pem", "client.pem", "client-key.pem")
#: Certificates (of the mesh's CA, server and client use) of the platform's monitoring: the supervisor serves its
#: metrics with one, Prometheus serves its UI and scrapes with the other. Neither name is a mesh service, so
#: neither grants a service identity anywhere.
MONITORING_IDENTITIES = ("supervisor", "prometheus")
#: The alert rules the local Prometheus loads (deploy/k8s renders the same rules as a PrometheusRule).
ALERT_RULES = Path("deploy") / "monitoring" / "aidc-alerts.yml"


def _is_s3_url(repository: str) -> bool:
    """A model repository Triton reads from S3 (services.serving.s3mirror.is_s3_url, not imported: the supervisor
    loads no service's modules or SDKs)."""
    return repository.startswith("s3://")


@dataclass(frozen=True)
class ProbeSpec:
    """How to ask a component whether it is ready: gRPC health (overall ""), HTTP GET (200) or TCP connect. A gRPC
    probe speaks the mesh's TLS, accepting only the certificate ``server_name`` ("aidc-<service>"; empty: any that
    names the target's host), or with ``tls_dir`` mutual TLS with that directory's ca.pem and client cert."""

    kind: ProbeKind
    target: str
    tls_dir: str = ""
    server_name: str = ""

    def describe(self) -> str:
        """Human-readable form for error messages."""
        return {"grpc": "gRPC health at", "http": "GET", "tcp": "TCP connect to"}[self.kind] + f" {self.target}"


@dataclass(frozen=True)
class ComponentSpec:
    """One supervised OS process."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: Path
    log_file: Path
    probe: ProbeSpec
    #: The main address shown in tables; `endpoints` lists every user-facing one.
    address: str
    endpoints: tuple[str, ...]
    #: Every host:port the process listens on; checked free before the first start.
    listens: tuple[str, ...]
    start_stage: int
    #: Lower stops first: services, then Triton and the object store, then the collector (to get final spans).
    stop_stage: int
    #: Where its Prometheus metrics are read ("" when it serves none).
    metrics_url: str = ""


@dataclass(frozen=True)
class S3Credentials:
    """The object store's single identity, shared with the services that talk S3."""

    access_key_id: str
    secret_access_key: str


@dataclass(frozen=True)
class Platform:
    """Resolved settings (absolute paths) plus the S3 identity: what the component specs come from."""

    mesh: MeshSettings
    platform: PlatformSettings
    credentials: S3Credentials
    project_root: Path = field(default_factory=lambda: Path(__file__).resolve().parents[2])

    @property
    def data_dir(self) -> Path:
        return self.mesh.data_dir

    @property
    def logs_dir(self) -> Path:
        return self.mesh.data_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.mesh.data_dir / "run"

    @property
    def s3_dir(self) -> Path:
        return self.mesh.data_dir / "s3"

    @property
    def model_repository(self) -> Path:
        """The local repository directory; with an S3 repository, the serving service's staging area."""
        if _is_s3_url(self.platform.model_repository):
            return self.mesh.data_dir / "serving" / "model_repository"
        return self.platform.model_repository_path(self.mesh.data_dir)

    @property
    def model_repository_url(self) -> str:
        """The repository Triton reads (and AIDC_MODEL_REPOSITORY of the services): an S3 URL as configured, else
        the local directory."""
        configured = self.platform.model_repository
        return configured if _is_s3_url(configured) else str(self.model_repository)

    @property
    def triton_dir(self) -> Path:
        return self.platform.runtime_dir / "pytriton" / "tritonserver"

    @property
    def triton_work_dir(self) -> Path:
        """Triton's working directory: private, and holding nothing but Triton's own TLS files."""
        return self.mesh.data_dir / "triton"

    @property
    def triton_tls_dir(self) -> Path:
        """Triton's CA, its server certificate and the one client certificate (the platform's), made by each
        `aidc up` (AIDC_TRITON_TLS_DIR of the services)."""
        return self.triton_work_dir / "tls"

    @property
    def weed_bin(self) -> Path:
        return self.platform.runtime_dir / "bin" / "weed"

    @property
    def prometheus_dir(self) -> Path:
        """The local Prometheus's configuration and time series (`aidc up --monitoring`)."""
        return self.mesh.data_dir / "prometheus"


def resolve_platform(mesh: MeshSettings, platform: PlatformSettings, credentials: S3Credentials) -> Platform:
    """Makes every path absolute (children run elsewhere) and records the S3 identity."""
    mesh = dataclasses.replace(mesh, data_dir=mesh.data_dir.resolve())
    repository = platform.model_repository
    if repository and not _is_s3_url(repository):
        repository = str(Path(repository).resolve())
    platform = dataclasses.replace(
        platform,
        runtime_dir=platform.runtime_dir.resolve(),
        model_repository=repository,
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
    )
    return Platform(mesh=mesh, platform=platform, credentials=credentials)


def ensure_s3_credentials(platform: PlatformSettings, data_dir: Path) -> S3Credentials:
    """The S3 identity: AWS_* when set, else one generated once and kept in data_dir/s3/credentials.json."""
    if platform.aws_access_key_id:
        return S3Credentials(platform.aws_access_key_id, platform.aws_secret_access_key)
    path = data_dir / "s3" / "credentials.json"
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        return S3Credentials(stored["access_key_id"], stored["secret_access_key"])
    alphabet = string.ascii_uppercase + string.digits
    credentials = S3Credentials(
        access_key_id="AIDC" + "".join(secrets.choice(alphabet) for _ in range(16)),
        secret_access_key=secrets.token_urlsafe(30),
    )
    stored = {"access_key_id": credentials.access_key_id, "secret_access_key": credentials.secret_access_key}
    write_private(path, (json.dumps(stored, indent=2) + "\n").encode())
    logger.info("generated S3 credentials in %s", path)
    return credentials


def write_s3_identity_config(path: Path, credentials: S3Credentials) -> None:
    """SeaweedFS's identity file; without one its S3 gateway lets anyone do anything."""
    config = {
        "identities": [
            {
                "name": "aidc",
                "credentials": [{"accessKey": credentials.access_key_id, "secretKey": credentials.secret_access_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    write_private(path, (json.dumps(config, indent=2) + "\n").encode())


def write_triton_tls(platform: Platform) -> None:
    """A new CA for Triton's gRPC endpoint, Triton's server certificate and one client certificate, in
    ``triton_tls_dir``; the CA's key is deleted once they are issued, so no other client certificate can ever be
    made for this Triton (the next `aidc up` makes a new CA)."""
    directory = platform.triton_tls_dir
    host, _ = parse_address(platform.platform.triton_grpc_addr)
    init_certificates(directory, services=(), clients=("client",), force=True)
    issue_service_certificate(directory, "triton", hosts=(host,))
    (directory / "ca-key.pem").unlink()


def prepare_data_dir(platform: Platform) -> None:
    """Creates the directories every component expects (private: 0700; an existing data directory is made private
    too), writes the object store's identity config and Triton's TLS files."""
    for directory in (
        platform.data_dir,
        platform.logs_dir,
        platform.run_dir,
        platform.s3_dir / "data",
        platform.s3_dir / "log",
        platform.triton_work_dir,
        platform.model_repository,
    ):
        private_dir(directory)
    write_s3_identity_config(platform.s3_dir / "s3.json", platform.credentials)
    write_triton_tls(platform)
    if platform.platform.monitoring:
        private_dir(platform.prometheus_dir / "data")
        write_prometheus_config(platform)
    if platform.platform.ray:
        prepare_ray(platform)


def settings_env(settings: Any) -> dict[str, str]:
    """A settings dataclass written back as the environment variables it is read from."""
    out: dict[str, str] = {}
    for described, f in zip(describe_settings(type(settings)), dataclasses.fields(settings), strict=True):
        value = getattr(settings, f.name)
        out[described.env] = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return out


def weed_argv(platform: Platform) -> tuple[str, ...]:
    """SeaweedFS all-in-one, every listener on an explicit port and every file under the data directory."""
    p = platform.platform
    host, s3_port = parse_address(p.s3_endpoint)
    return (
        str(platform.weed_bin),
        f"-logdir={platform.s3_dir / 'log'}",
        "mini",
        f"-dir={platform.s3_dir / 'data'}",
        f"-ip={host}",
        f"-ip.bind={host}",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={platform.s3_dir / 's3.json'}",
        f"-s3.localSocket={socket_path(platform.s3_dir, 's3.sock')}",
        f"-filer.localSocket={socket_path(platform.s3_dir, 'filer.sock')}",
        f"-s3.port={s3_port}",
        f"-s3.port.grpc={p.seaweedfs_s3_grpc_port}",
        f"-master.port={p.seaweedfs_master_port}",
        f"-master.port.grpc={p.seaweedfs_master_grpc_port}",
        f"-volume.port={p.seaweedfs_volume_port}",
        f"-volume.port.grpc={p.seaweedfs_volume_grpc_port}",
        f"-filer.port={p.seaweedfs_filer_port}",
        f"-filer.port.grpc={p.seaweedfs_filer_grpc_port}",
        f"-admin.port={p.seaweedfs_admin_port}",
        f"-admin.port.grpc={p.seaweedfs_admin_grpc_port}",
    )


def _weed_ports(p: PlatformSettings) -> tuple[int, ...]:
    return (
        p.seaweedfs_s3_grpc_port,
        p.seaweedfs_master_port,
        p.seaweedfs_master_grpc_port,
        p.seaweedfs_volume_port,
        p.seaweedfs_volume_grpc_port,
        p.seaweedfs_filer_port,
        p.seaweedfs_filer_grpc_port,
        p.seaweedfs_admin_port,
        p.seaweedfs_admin_grpc_port,
    )


def triton_argv(platform: Platform) -> tuple[str, ...]:
    """Triton with explicit model control over the live repository, CPU-only pools, OpenTelemetry export; its gRPC
    endpoint admits only holders of the client certificate in ``triton_tls_dir`` (mutual TLS); no HTTP endpoint;
    metrics only when AIDC_TRITON_METRICS_PORT is set."""
    p = platform.platform
    grpc_host, grpc_port = parse_address(p.triton_grpc_addr)
    tls = platform.triton_tls_dir
    # Triton's own exit timeout must end before the supervisor's SIGKILL does.
    exit_timeout = max(1, int(p.stop_grace_seconds) // 2)
    metrics = (
        (f"--metrics-address={grpc_host}", f"--metrics-port={p.triton_metrics_port}")
        if p.triton_metrics_port
        else ("--allow-metrics=false",)
    )
    return (
        str(platform.triton_dir / "bin" / "tritonserver"),
        f"--model-repository={platform.model_repository_url}",
        f"--backend-directory={platform.triton_dir / 'backends'}",
        "--model-control-mode=explicit",
        "--disable-auto-complete-config",
        # Ready means the server takes requests. Triton's default (strict) is ready only while every model is: one
        # tenant's model that fails to load, or is loading, would make Triton, serving's ServerReady and the
        # supervisor's health say "not ready" for every tenant.
        "--strict-readiness=false",
        f"--grpc-address={grpc_host}",
        f"--grpc-port={grpc_port}",
        "--grpc-use-ssl=true",
        "--grpc-use-ssl-mutual=true",
        f"--grpc-root-cert={tls / 'ca.pem'}",
        f"--grpc-server-cert={tls / 'triton.pem'}",
        f"--grpc-server-key={tls / 'triton-key.pem'}",
        # Triton's HTTP endpoint has no TLS: it stays off (nothing here uses it).
        "--allow-http=false",
        *metrics,
        "--pinned-memory-pool-byte-size=0",
        "--cuda-memory-pool-byte-size=0:0",
        "--allow-gpu-metrics=false",
        f"--exit-timeout-secs={exit_timeout}",
        "--trace-config",
        "mode=opentelemetry",
        # Without a level Triton traces nothing (its default is OFF), whatever the other trace flags say.
        "--trace-config",
        "level=TIMESTAMPS",
        "--trace-config",
        f"rate={p.triton_trace_rate}",
        "--trace-config",
        f"opentelemetry,url=http://{p.collector_addr}/v1/traces",
        "--trace-config",
        "opentelemetry,resource=service.name=triton",
        "--trace-config",
        "opentelemetry,bsp_schedule_delay=500",
    )


#: Variables Triton gets from the environment `aidc up` runs in: locale, paths, the GPU runtime's. Nothing else: no
#: AIDC_* (master keys, database URL), no PG*, no AWS_* (unless it reads its repository from S3), no OTEL_*.
_TRITON_INHERITED = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH")
_TRITON_INHERITED_PREFIXES = ("LC_", "CUDA_", "NVIDIA_")
#: What an S3 model repository needs: Triton's S3 client reads AWS_*; the s3mirror step before it (which creates
#: the bucket) reads the object store's connection settings.
_TRITON_S3_SETTINGS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AIDC_STORAGE_S3_SECURE",
    "AIDC_STORAGE_S3_CA_FILE",
    "AIDC_STORAGE_S3_REGION",
    "AIDC_STORAGE_S3_TIMEOUT_SECONDS",
)


def _triton_env(platform: Platform, base: Mapping[str, str], env: Mapping[str, str]) -> dict[str, str]:
    """Triton's whole environment. TorchScript can read files and the python backend runs model code: Triton must
    hold no platform secret it does not need (``env`` is the services' environment, secrets included)."""
    out = {k: v for k, v in base.items() if k in _TRITON_INHERITED or k.startswith(_TRITON_INHERITED_PREFIXES)}
    # The python backend stub runs its own interpreter and ignores PYTHONPATH: it finds torch and numpy<2
    # through the first python on PATH, which must be this venv's.
    out["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), base.get("PATH", os.defpath)])
    out["TORCH_NUM_THREADS"] = "1"
    out["PYTHONUNBUFFERED"] = "1"
    if _is_s3_url(platform.platform.model_repository):
        out.update({k: env[k] for k in _TRITON_S3_SETTINGS if env.get(k)})
    return out


def _scrape_host(host: str) -> str:
    """Where a listener on ``host`` is reached locally (a wildcard bind is reached on loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def metrics_url(platform: Platform, port: int) -> str:
    """The /metrics URL of a listener of the platform on ``port`` (https when the mesh's certificates are on)."""
    scheme = "http" if platform.mesh.tls_dir() is None else "https"
    return f"{scheme}://{_scrape_host(platform.mesh.host)}:{port}/metrics"


def _metrics_components(platform: Platform) -> list[tuple[str, int]]:
    """(job, port) of everything that serves metrics: the supervisor and the mesh services started."""
    p = platform.platform
    chosen = [name for name in ("supervisor", *SERVICE_NAMES) if name == "supervisor" or name in p.platform_components]
    return [(name, p.metrics_port(name)) for name in chosen if p.metrics_port(name)]


def write_prometheus_config(platform: Platform) -> None:
    """The local Prometheus's configuration: every metrics endpoint of the platform scraped (over mutual TLS with
    the ``prometheus`` certificate when the mesh has certificates), the alert rules loaded; and, with certificates,
    its web configuration (HTTPS, a client certificate of the mesh's CA required). JSON is YAML to Prometheus."""
    tls_dir = platform.mesh.tls_dir()
    directory = platform.prometheus_dir
    tls: dict[str, object] = {}
    if tls_dir is not None:
        tls = {
            "scheme": "https",
            "tls_config": {
                "ca_file": str(tls_dir / "ca.pem"),
                "cert_file": str(tls_dir / "prometheus.pem"),
                "key_file": str(tls_dir / "prometheus-key.pem"),
            },
        }
    host = _scrape_host(platform.mesh.host)
    jobs = [*_metrics_components(platform), ("prometheus", platform.platform.prometheus_port)]
    interval = f"{platform.platform.prometheus_scrape_interval_seconds:g}s"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(platform.project_root / ALERT_RULES)],
        "scrape_configs": [
            {"job_name": job, **tls, "static_configs": [{"targets": [f"{host}:{port}"]}]} for job, port in jobs
        ],
    }
    write_private(directory / "prometheus.yml", (json.dumps(config, indent=2) + "\n").encode())
    if tls_dir is not None:
        web = {
            "tls_server_config": {
                "cert_file": str(tls_dir / "prometheus.pem"),
                "key_file": str(tls_dir / "prometheus-key.pem"),
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_ca_file": str(tls_dir / "ca.pem"),
            }
        }
        write_private(directory / "web.yml", (json.dumps(web, indent=2) + "\n").encode())


def prometheus_argv(platform: Platform) -> tuple[str, ...]:
    """Prometheus on the platform's host and its port, everything under <data_dir>/prometheus."""
    p = platform.platform
    directory = platform.prometheus_dir
    binary = shutil.which(p.prometheus_bin) or p.prometheus_bin
    web = (f"--web.config.file={directory / 'web.yml'}",) if platform.mesh.tls_dir() is not None else ()
    return (
        binary,
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address={platform.mesh.host}:{p.prometheus_port}",
        *web,
        "--storage.tsdb.retention.time=7d",
    )


def _child_env(platform: Platform, base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    env.update(settings_env(platform.mesh))
    env.update(settings_env(platform.platform))
    # Triton and the serving service read AWS_* (above) for an S3 repository.
    env["AIDC_MODEL_REPOSITORY"] = platform.model_repository_url
    env["AIDC_TRITON_TLS_DIR"] = str(platform.triton_tls_dir)
    env["PYTHONUNBUFFERED"] = "1"
    if platform.platform.ray:
        # The scheduler's Ray pool is the local head (unless the operator points it at another cluster).
        env.setdefault("AIDC_SCHEDULER_RAY_ADDRESS", ray_address(platform))
        if platform.mesh.host in ("127.0.0.1", "localhost"):
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # a one-machine cluster stays on loopback
    return env


def build_components(platform: Platform, base_env: Mapping[str, str] | None = None) -> list[ComponentSpec]:
    """The specs of the components selected by AIDC_PLATFORM_COMPONENTS, in start order."""
    base = dict(os.environ if base_env is None else base_env)
    env = _child_env(platform, base)
    p = platform.platform
    logs = platform.logs_dir
    python = sys.executable
    specs: dict[str, ComponentSpec] = {}

    specs["collector"] = ComponentSpec(
        name="collector",
        argv=(python, "-m", "services.collector"),
        env=env,
        cwd=platform.project_root,
        log_file=logs / "collector.log",
        probe=ProbeSpec("http", f"http://{p.collector_addr}/healthz"),
        address=p.collector_addr,
        endpoints=(f"OTLP/HTTP http://{p.collector_addr}/v1/traces",),
        listens=(p.collector_addr,),
        start_stage=_RUNTIME_STAGE,
        stop_stage=2,
    )

    s3_host, _ = parse_address(p.s3_endpoint)
    specs["s3"] = ComponentSpec(
        name="s3",
        argv=weed_argv(platform),
        env=env,
        cwd=platform.s3_dir,
        log_file=logs / "s3.log",
        probe=ProbeSpec("http", f"http://{p.s3_endpoint}/healthz"),
        address=p.s3_endpoint,
        endpoints=(f"S3 http://{p.s3_endpoint}",),
        listens=(p.s3_endpoint, *(f"{s3_host}:{port}" for port in _weed_ports(p))),
        start_stage=_RUNTIME_STAGE,
        stop_stage=1,
    )

    grpc_host, _ = parse_address(p.triton_grpc_addr)
    triton = triton_argv(platform)
    if _is_s3_url(p.model_repository):
        # Triton exits at once on a bucket or prefix that does not exist yet: this creates them (waiting for the
        # object store, started alongside), then execs Triton in the same process.
        wait = f"--wait={p.startup_timeout_seconds:g}"
        triton = (python, "-m", "services.serving.s3mirror", wait, platform.model_repository_url, "--", *triton)
    metrics = (f"{grpc_host}:{p.triton_metrics_port}",) if p.triton_metrics_port else ()
    specs["triton"] = ComponentSpec(
        name="triton",
        argv=triton,
        env=_triton_env(platform, base, env),
        cwd=platform.triton_work_dir,
        log_file=logs / "triton.log",
        probe=ProbeSpec("grpc", p.triton_grpc_addr, tls_dir=str(platform.triton_tls_dir)),
        address=p.triton_grpc_addr,
        endpoints=(
            f"KServe v2 gRPC {p.triton_grpc_addr} (mutual TLS: {platform.triton_tls_dir})",
            *(f"metrics http://{address}/metrics" for address in metrics),
        ),
        listens=(p.triton_grpc_addr, *metrics),
        start_stage=_RUNTIME_STAGE,
        stop_stage=1,
    )

    for service in SERVICE_NAMES:
        address = platform.mesh.address_of(service)
        tenant = platform.mesh.tenant_address_of(service)
        port = p.metrics_port(service)
        exported = f"{platform.mesh.host}:{port}" if port else ""
        if platform.mesh.metrics_addr == "off":  # the operator switched metrics off altogether
            port, exported = 0, "off"
        own = {"AIDC_METRICS_ADDR": exported}
        if service == "scheduler" and p.ray and env["AIDC_SCHEDULER_RAY_ADDRESS"] == ray_address(platform):
            own |= ray_auth_environment(platform)  # it joins the local head, which wants the token
            # Its default pool's node offers what the head does not (unless the operator said what it offers).
            own |= {k: v for k, v in ray_share(platform, env).default_pool_env().items() if k not in env}
        specs[service] = ComponentSpec(
            name=service,
            argv=(python, "-m", f"services.{service}"),
            env={**env, **own},
            cwd=platform.project_root,
            log_file=logs / f"{service}.log",
            probe=ProbeSpec("grpc", address, server_name=f"aidc-{service}"),
            address=address,
            endpoints=(
                f"mesh gRPC {address}",
                *((f"tenant gRPC {tenant}",) if tenant else ()),
                *((f"metrics {metrics_url(platform, port)}",) if port else ()),
            ),
            listens=(address, *((tenant,) if tenant else ()), *((exported,) if port else ())),
            start_stage=_SERVICE_STAGE,
            stop_stage=0,
            metrics_url=metrics_url(platform, port) if port else "",
        )

    chosen = [specs[name] for name in specs if name in p.platform_components]
    if p.ray:
        address = ray_address(platform)
        chosen.insert(
            0,
            ComponentSpec(
                name="ray",
                argv=ray_head_argv(platform, ray_share(platform, env)),
                env={
                    **env,
                    **ray_auth_environment(platform),
                    RAY_MONITOR_PORT[0]: str(p.ray_port + RAY_MONITOR_PORT[1]),
                },
                cwd=platform.run_dir,
                log_file=logs / "ray.log",
                probe=ProbeSpec("tcp", address),
                address=address,
                endpoints=(
                    f"Ray GCS {address} (the scheduler's pool {env.get('AIDC_SCHEDULER_RAY_POOL', 'ray')}; token "
                    f"authentication, the token in {ray_auth_environment(platform)['RAY_AUTH_TOKEN_PATH']}; ports "
                    "{}-{})".format(*ray_ports(platform)),
                ),
                listens=(
                    address,
                    *(
                        f"{platform.mesh.host}:{p.ray_port + offset}"
                        for offset in (*RAY_PORT_OFFSETS.values(), RAY_MONITOR_PORT[1])
                    ),
                ),
                start_stage=_RUNTIME_STAGE,
                stop_stage=1,
            ),
        )
    if p.monitoring:
        web = f"{platform.mesh.host}:{p.prometheus_port}"
        scheme = "http" if platform.mesh.tls_dir() is None else "https"
        chosen.append(
            ComponentSpec(
                name="prometheus",
                argv=prometheus_argv(platform),
                env=env,
                cwd=platform.prometheus_dir,
                log_file=logs / "prometheus.log",
                probe=ProbeSpec("http", f"{scheme}://{_scrape_host(platform.mesh.host)}:{p.prometheus_port}/-/ready"),
                address=web,
                endpoints=(f"Prometheus {scheme}://{web} (alert rules: {ALERT_RULES})",),
                listens=(web,),
                start_stage=_SERVICE_STAGE,
                stop_stage=0,
                metrics_url=f"{scheme}://{_scrape_host(platform.mesh.host)}:{p.prometheus_port}/metrics",
            )
        )
    return chosen
