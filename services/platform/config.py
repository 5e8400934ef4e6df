"""Settings of the local platform supervisor (`aidc up`): runtime, Triton, SeaweedFS, collector, timing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.mesh.config import SERVICE_NAMES, ObjectStoreConnection, parse_address, setting

__all__ = ["RUNTIME_COMPONENTS", "ALL_COMPONENTS", "PlatformSettings"]

#: Processes `aidc up` starts before the mesh services, in start order.
RUNTIME_COMPONENTS: tuple[str, ...] = ("collector", "s3", "triton")

#: Every component `aidc up` knows, in start order.
ALL_COMPONENTS: tuple[str, ...] = RUNTIME_COMPONENTS + SERVICE_NAMES


@dataclass(frozen=True)
class PlatformSettings(ObjectStoreConnection):
    """What `aidc up` starts and where; every port is explicit so nothing silently moves when one is busy. The
    object store's endpoint and keys are the services' own (ObjectStoreConnection): it passes them on."""

    runtime_dir: Path = setting(Path(".runtime"), "Folder holding tritonserver and weed (made by `make install`).")
    platform_components: tuple[str, ...] = setting(
        ALL_COMPONENTS, "Comma-separated components `aidc up` starts (subset of the default list)."
    )
    model_repository: str = setting("", "Triton's live model repository; empty means <data_dir>/model_repository.")
    collector_addr: str = setting("127.0.0.1:50060", "Address of the trace collector (OTLP/HTTP JSON receiver).")
    triton_grpc_addr: str = setting("127.0.0.1:50061", "Triton's KServe v2 gRPC endpoint.")
    triton_metrics_port: int = setting(
        0,
        "Triton's Prometheus metrics port, on the host of its gRPC endpoint; 0: off. Plain HTTP without "
        "authentication (Triton has none for it): any local user can read it, deployment names included.",
    )
    seaweedfs_s3_grpc_port: int = setting(50071, "SeaweedFS S3 gateway gRPC port.")
    seaweedfs_master_port: int = setting(50072, "SeaweedFS master HTTP port.")
    seaweedfs_master_grpc_port: int = setting(50073, "SeaweedFS master gRPC port.")
    seaweedfs_volume_port: int = setting(50074, "SeaweedFS volume server HTTP port.")
    seaweedfs_volume_grpc_port: int = setting(50075, "SeaweedFS volume server gRPC port.")
    seaweedfs_filer_port: int = setting(50076, "SeaweedFS filer HTTP port.")
    seaweedfs_filer_grpc_port: int = setting(50077, "SeaweedFS filer gRPC port.")
    seaweedfs_admin_port: int = setting(50078, "SeaweedFS admin server HTTP port (it listens even with its UI off).")
    seaweedfs_admin_grpc_port: int = setting(50079, "SeaweedFS admin server gRPC port.")
    startup_timeout_seconds: float = setting(120.0, "How long `aidc up` waits for every component to be SERVING.")
    stop_grace_seconds: float = setting(15.0, "Seconds a component gets after SIGTERM before SIGKILL.")
    restart_backoff_seconds: float = setting(0.5, "First delay before restarting a crashed component (doubles).")
    restart_backoff_max_seconds: float = setting(30.0, "Longest delay between restarts of a crash-looping component.")
    monitoring: bool = setting(
        False,
        "Also run a local Prometheus (Debian's `prometheus` package; `aidc up --monitoring`) scraping every component "
        "over mutual TLS, with the alert rules of deploy/monitoring loaded.",
    )
    prometheus_bin: str = setting("prometheus", "The Prometheus server binary (a path, or a name looked up on PATH).")
    prometheus_port: int = setting(
        50159, "Port of the local Prometheus's web UI and API (HTTPS; a client certificate of the mesh's CA required)."
    )
    prometheus_scrape_interval_seconds: float = setting(
        15.0, "How often the local Prometheus scrapes every component and evaluates the alert rules."
    )
    ray: bool = setting(
        False,
        "Also run a local Ray head (`aidc up --ray`; the aidc[ray] extra, which `make install` installs) and give the "
        "scheduler a Ray pool backed by it. Off: nothing of Ray starts or is imported.",
    )
    ray_port: int = setting(
        50160,
        "Port of the local Ray head's GCS (the address the scheduler and drivers join); its other listeners and its "
        "workers take the 39 ports after it.",
    )
    ray_cpus: int = setting(
        0,
        "Cores of this machine the local Ray head offers, with memory in the same proportion; 0: half of them (all "
        "of them when AIDC_SCHEDULER_REGISTER_LOCAL_NODE=false). The default pool's node offers the rest: no core is "
        "offered by both pools.",
    )
    supervisor_metrics_port: int = setting(
        50150, "Port of the supervisor's own metrics (components up, restarts and why); 0: none."
    )
    auth_metrics_port: int = setting(50151, "Port of the auth service's /metrics under `aidc up`; 0: none.")
    storage_metrics_port: int = setting(50152, "Port of the storage service's /metrics under `aidc up`; 0: none.")
    training_metrics_port: int = setting(50153, "Port of the training service's /metrics under `aidc up`; 0: none.")
    scheduler_metrics_port: int = setting(50154, "Port of the scheduler service's /metrics under `aidc up`; 0: none.")
    billing_metrics_port: int = setting(50155, "Port of the billing service's /metrics under `aidc up`; 0: none.")
    serving_metrics_port: int = setting(
        50156,
        "Port of the serving service's /metrics under `aidc up`, Triton's figures included (read from Triton's "
        "statistics over its mutual TLS, so Triton's own plain-HTTP metrics port can stay off); 0: none.",
    )
    health_check_interval_seconds: float = setting(
        5.0, "How often the supervisor asks each running component whether it is healthy."
    )
    health_check_timeout_seconds: float = setting(3.0, "How long one health check waits for an answer.")
    health_check_failures: int = setting(
        3,
        "Health checks in a row that get no answer (a hung or stopped process) after which the supervisor kills the "
        "component and restarts it (with the crash backoff).",
    )
    triton_trace_rate: int = setting(
        1,
        "Triton traces one request in this many (1: every request, so each inference trace holds Triton's spans). "
        "Triton 2.51's OpenTelemetry tracing can crash it under heavy concurrency (upstream issue #7795, fixed "
        "after 2.51): raise this to sample on busy servers; the supervisor restarts Triton and serving reloads its "
        "models if it does crash.",
    )

    def metrics_port(self, component: str) -> int:
        """The metrics port `aidc up` gives a mesh service or the supervisor (0: none)."""
        return int(getattr(self, f"{component}_metrics_port", 0))

    def model_repository_path(self, data_dir: Path) -> Path:
        """Triton's live model repository: the configured one, or <data_dir>/model_repository."""
        return Path(self.model_repository) if self.model_repository else data_dir / "model_repository"

    def validate(self) -> None:
        """Fails fast on values that can't work; called by load_settings."""
        for env, value in (
            ("AIDC_COLLECTOR_ADDR", self.collector_addr),
            ("AIDC_TRITON_GRPC_ADDR", self.triton_grpc_addr),
        ):
            try:
                parse_address(value)
            except ValueError as exc:
                raise ValueError(f"{env}: {exc}") from None
        unknown = [c for c in self.platform_components if c not in ALL_COMPONENTS]
        if unknown or not self.platform_components:
            raise ValueError(
                f"AIDC_PLATFORM_COMPONENTS must name some of {', '.join(ALL_COMPONENTS)}; unknown: {unknown}"
            )
        self.check_object_store_connection()
        for name in ("prometheus_port", *(f"{c}_metrics_port" for c in ("supervisor", *SERVICE_NAMES))):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"AIDC_{name.upper()} must be a port number or 0, not {getattr(self, name)}")
        if self.health_check_interval_seconds <= 0 or self.health_check_timeout_seconds <= 0:
            raise ValueError(
                "AIDC_HEALTH_CHECK_INTERVAL_SECONDS and AIDC_HEALTH_CHECK_TIMEOUT_SECONDS must be positive"
            )
        if self.health_check_failures < 1:
            raise ValueError("AIDC_HEALTH_CHECK_FAILURES must be at least 1")
        if not 0 <= self.triton_metrics_port <= 65535:
            raise ValueError(f"AIDC_TRITON_METRICS_PORT must be a port number or 0, not {self.triton_metrics_port}")
        for name in (
            "seaweedfs_s3_grpc_port",
            "seaweedfs_master_port",
            "seaweedfs_master_grpc_port",
            "seaweedfs_volume_port",
            "seaweedfs_volume_grpc_port",
            "seaweedfs_filer_port",
            "seaweedfs_filer_grpc_port",
            "seaweedfs_admin_port",
            "seaweedfs_admin_grpc_port",
            "ray_port",
        ):
            if not 0 < getattr(self, name) <= 65535:
                raise ValueError(f"AIDC_{name.upper()} must be a port number, not {getattr(self, name)}")
        if self.startup_timeout_seconds <= 0 or self.stop_grace_seconds <= 0:
            raise ValueError("AIDC_STARTUP_TIMEOUT_SECONDS and AIDC_STOP_GRACE_SECONDS must be positive")
        if self.ray_port + 39 > 65535:
            raise ValueError(f"AIDC_RAY_PORT leaves no room for the Ray head's 39 ports after it: {self.ray_port}")
        if self.ray_cpus < 0:
            raise ValueError(f"AIDC_RAY_CPUS must be 0 (half of this machine's cores) or more, not {self.ray_cpus}")
        if self.triton_trace_rate < 1:
            raise ValueError("AIDC_TRITON_TRACE_RATE must be at least 1")
        if not 0 < self.restart_backoff_seconds <= self.restart_backoff_max_seconds:
            raise ValueError("need 0 < AIDC_RESTART_BACKOFF_SECONDS <= AIDC_RESTART_BACKOFF_MAX_SECONDS")
