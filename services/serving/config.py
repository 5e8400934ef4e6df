"""Settings of the serving service: Triton's endpoint, the live model repository and its flavour, rollouts, and the
gateway's per-tenant rate limit, budget cache and metering."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.mesh.config import MeshSettings, load_settings, setting
from services.mesh.errors import InvalidArgument
from services.serving.s3mirror import S3RepositoryURL, is_s3_url
from services.serving.triton import TritonAccess

__all__ = ["ServingSettings", "FLAVOURS"]

#: Triton model flavours the repository writer produces from one TorchScript export.
FLAVOURS = ("python", "libtorch")


@dataclass(frozen=True)
class ServingSettings(MeshSettings):
    """MeshSettings plus Triton, the live repository, rollout limits and the gateway's limits."""

    triton_grpc_addr: str = setting("127.0.0.1:50061", "Triton's KServe v2 gRPC endpoint.")
    triton_tls_dir: str = setting(
        "",
        "Directory with ca.pem, client.pem and client-key.pem: mutual TLS to Triton's gRPC endpoint (`aidc up` makes "
        "them, in <data_dir>/triton/tls); empty: plaintext.",
    )
    triton_access_key_file: str = setting(
        "",
        "File holding the secret of Triton's --grpc-restricted-protocol (key aidc-triton-key), sent on every call to "
        "Triton (a cluster's Secret); empty: none.",
    )
    model_repository: str = setting(
        "",
        "Triton's live model repository; empty means <data_dir>/model_repository. An s3://host:port/bucket/prefix "
        "URL: Triton reads it from S3 (AWS_* credentials), the serving service stages it in "
        "<data_dir>/serving/model_repository and mirrors it there.",
    )
    serving_flavour: str = setting(
        "python",
        "How deployments run in Triton: `python` (python backend running TorchScript, tokenizer inside; CPU "
        "machines) or `libtorch` (an ensemble of a tokenizer step and `pytorch_libtorch`; the NGC image on GPUs).",
    )
    serving_python_env: str = setting(
        "",
        "Virtualenv the python-backend models run in (EXECUTION_ENV_PATH); empty: the first python on Triton's PATH.",
    )
    serving_rollout_timeout_seconds: float = setting(
        300.0, "How long loading and probing a new version may take before the rollout fails."
    )
    serving_reconcile_interval_seconds: float = setting(
        2.0, "Seconds between checks that Triton still serves every deployment (reloads after a Triton restart)."
    )
    serving_alias_poll_seconds: float = setting(
        10.0, "Seconds between checks of the registry for moved aliases of deployments that follow one."
    )
    serving_route_refresh_seconds: float = setting(
        1.0,
        "Seconds between each replica's reads of the deployments' routes: a rollout or undeploy (run by the leader) "
        "reaches every replica's gateway within this; a replaced version is unloaded only after it.",
    )
    serving_relay_triton_metrics: bool = setting(
        True,
        "Export Triton's per-model statistics (read over the gateway's channel) as nv_inference_* on the serving "
        "service's /metrics; turn off where Prometheus scrapes Triton's own metrics port (a cluster), or the series "
        "would be counted twice.",
    )
    serving_rate_limit_per_second: float = setting(
        200.0, "Inference requests per second each tenant may send through the gateway (token bucket); 0: no limit."
    )
    serving_rate_limit_burst: int = setting(400, "Requests a tenant may send at once above its rate.")
    serving_budget_cache_seconds: float = setting(
        5.0, "How long the gateway trusts billing's budget decision for a tenant before asking again."
    )
    serving_metering_interval_seconds: float = setting(
        1.0, "Seconds between the gateway's usage batches (and reads of Triton's compute statistics)."
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServingSettings:
        return load_settings(cls, env)

    def validate(self) -> None:
        super().validate()
        if self.serving_flavour not in FLAVOURS:
            raise ValueError(f"AIDC_SERVING_FLAVOUR must be one of {', '.join(FLAVOURS)}, not {self.serving_flavour!r}")
        for name in (
            "serving_rollout_timeout_seconds",
            "serving_reconcile_interval_seconds",
            "serving_alias_poll_seconds",
            "serving_route_refresh_seconds",
            "serving_metering_interval_seconds",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"AIDC_{name.upper()} must be > 0")
        if self.serving_rate_limit_per_second < 0 or self.serving_budget_cache_seconds < 0:
            raise ValueError("AIDC_SERVING_RATE_LIMIT_PER_SECOND and AIDC_SERVING_BUDGET_CACHE_SECONDS must be >= 0")
        if self.serving_rate_limit_burst < 1:
            raise ValueError("AIDC_SERVING_RATE_LIMIT_BURST must be at least 1")
        if self.model_repository_s3:
            try:
                S3RepositoryURL.parse(self.model_repository_s3)
            except InvalidArgument as exc:
                raise ValueError(f"AIDC_MODEL_REPOSITORY: {exc.message}") from None

    def triton_access(self) -> TritonAccess:
        """How this service reaches Triton (reads the access key file; the TLS files are read when a channel is
        made: a missing one stops the service at start)."""
        return TritonAccess.from_files(self.triton_grpc_addr, self.triton_tls_dir, self.triton_access_key_file)

    @property
    def serving_dir(self) -> Path:
        return self.data_dir / "serving"

    @property
    def model_repository_s3(self) -> str | None:
        """The repository's URL when Triton reads it from S3 (model_repository_path is then the staging area)."""
        return self.model_repository if is_s3_url(self.model_repository) else None

    @property
    def model_repository_path(self) -> Path:
        """The directory the repository is written in: Triton's own, or the staging area of an S3 repository."""
        if self.model_repository_s3:
            return self.serving_dir / "model_repository"
        return Path(self.model_repository) if self.model_repository else self.data_dir / "model_repository"
