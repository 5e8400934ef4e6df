"""Settings from environment variables: one frozen dataclass per service, loaded and validated in one place.

Every field of a settings dataclass is read from ``AIDC_<FIELD_NAME_UPPER>`` unless its metadata names another
variable (standard names such as ``OTEL_*`` or ``AWS_*``). Each field carries a ``doc`` in its metadata; the
README's configuration table is generated from these (``aidc config``), so it cannot drift from the code.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import secrets
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "SERVICE_NAMES",
    "TENANT_LISTENER_OFF",
    "MeshSettings",
    "ObjectStoreConnection",
    "ObjectStoreSettings",
    "Setting",
    "setting",
    "load_settings",
    "parse_flag",
    "parse_address",
    "describe_settings",
    "check_master_key",
    "master_key",
]

#: Every service of the mesh, in start order.
SERVICE_NAMES: tuple[str, ...] = ("auth", "storage", "training", "scheduler", "billing", "serving")

_S = TypeVar("_S")


def setting(default: Any, doc: str, env: str | None = None) -> Any:
    """Declares a settings field with its documentation and, optionally, a non-default variable name."""
    return field(default=default, metadata={"doc": doc, "env": env})


@dataclass(frozen=True)
class Setting:
    """One documented environment variable."""

    env: str
    default: str
    doc: str


def parse_address(value: str) -> tuple[str, int]:
    """Splits ``host:port``; raises ValueError with a clear message when it is not one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not a host:port address: {value!r}")
    return host.strip("[]"), int(port)


_TENANT_DOC = (
    "Tenant endpoint of {service}: TLS with the service's certificate but no client certificate (plaintext when "
    "the mesh is), a bearer token per call; no service identity and no mesh-only RPC there. 'off': none."
)
#: The value of a tenant address that turns the tenant listener off.
TENANT_LISTENER_OFF = "off"


@dataclass(frozen=True)
class MeshSettings:
    """Settings every service shares: where the data lives, where every service listens, TLS, limits."""

    data_dir: Path = setting(
        Path(".aidc"), "Directory for databases, logs, traces, certificates and the live model repository."
    )
    host: str = setting("127.0.0.1", "Interface the service listens on.")
    auth_addr: str = setting("127.0.0.1:50051", "Address of the auth service.")
    storage_addr: str = setting("127.0.0.1:50052", "Address of the storage service.")
    training_addr: str = setting("127.0.0.1:50053", "Address of the training service.")
    scheduler_addr: str = setting("127.0.0.1:50054", "Address of the scheduler service.")
    billing_addr: str = setting("127.0.0.1:50055", "Address of the billing service.")
    serving_addr: str = setting("127.0.0.1:50056", "Address of the serving gateway (KServe v2 inference endpoint).")
    auth_tenant_addr: str = setting("127.0.0.1:50041", _TENANT_DOC.format(service="the auth service"))
    storage_tenant_addr: str = setting("127.0.0.1:50042", _TENANT_DOC.format(service="the storage service"))
    training_tenant_addr: str = setting("127.0.0.1:50043", _TENANT_DOC.format(service="the training service"))
    scheduler_tenant_addr: str = setting("127.0.0.1:50044", _TENANT_DOC.format(service="the scheduler service"))
    billing_tenant_addr: str = setting("127.0.0.1:50045", _TENANT_DOC.format(service="the billing service"))
    serving_tenant_addr: str = setting(
        "127.0.0.1:50046", _TENANT_DOC.format(service="the serving gateway (KServe v2 inference included)")
    )
    certs_dir: str = setting(
        "",
        "Directory with ca.pem and <service>.pem/<service>-key.pem (from `aidc certs init`). Empty: <data_dir>/certs "
        "if it holds a CA (aidc up creates one), else plaintext, loopback only; 'off': plaintext.",
    )
    client_auth: str = setting(
        "require",
        "With certificates: 'require' a client certificate (mutual TLS) or 'none' (server TLS only).",
    )
    max_message_bytes: int = setting(64 * 1024 * 1024, "Largest gRPC message a service sends or receives.")
    shutdown_grace_seconds: float = setting(5.0, "Seconds in-flight RPCs get to finish on SIGTERM.")
    log_level: str = setting("INFO", "Log level: DEBUG, INFO, WARNING, ERROR.")
    decision_cache_seconds: float = setting(
        5.0,
        "How long an authorization decision is cached by a service: a revoked role keeps working in other services "
        "for at most this long.",
    )
    revocation_refresh_seconds: float = setting(
        5.0,
        "How often each service refetches auth's token-signing keys (JWKS) and list of revoked credentials: a revoked "
        "API key, ended login or job delegation, disabled user or retired signing key stops working in other "
        "services about this long after auth dropped it (refetched in the background, off the request path).",
    )
    revocation_max_stale_seconds: float = setting(
        30.0,
        "How long a service keeps trusting its last keys and revocation list while auth does not answer (an auth "
        "restart shorter than this is invisible to callers); past it, token-bearing calls fail UNAVAILABLE. The "
        "upper bound on a revocation's delay when auth is unreachable.",
    )
    metrics_addr: str = setting(
        "",
        "host:port where this process serves its Prometheus metrics at /metrics (TLS and a client certificate of the "
        "mesh's CA required when certificates are on); empty: recorded but not served; 'off': not recorded at all. "
        "`aidc up` gives each component its own port (AIDC_<COMPONENT>_METRICS_PORT).",
    )
    leader_lease_seconds: float = setting(
        6.0,
        "Lifetime of the lease that makes one replica of a service its leader (the one running the background loops "
        "that must run once). Another replica takes over at most a third of it after the leader stopped cleanly, at "
        "most 4/3 of it after the leader died.",
    )
    advertise_addr: str = setting(
        "",
        "host:port at which the other replicas of this service reach this one (they forward to their leader the RPCs "
        "only it serves); empty: the service's own address (AIDC_<SERVICE>_ADDR). On Kubernetes: the pod's IP.",
    )
    database_url: str = setting(
        "",
        "SQLAlchemy URL of the services' databases; '{service}' in it is replaced by the service name (give each "
        "service its own database, e.g. postgresql+psycopg://u:p@db/aidc_{service}); empty: a SQLite file "
        "<data_dir>/<service>/<service>.db per service.",
    )

    def address_of(self, service: str) -> str:
        """The configured address of a mesh service."""
        value = getattr(self, f"{service}_addr", None)
        if not isinstance(value, str):
            raise ValueError(f"unknown service: {service!r}")
        return value

    def tenant_address_of(self, service: str) -> str | None:
        """The configured tenant endpoint of a mesh service; None when it has none ('off')."""
        value = getattr(self, f"{service}_tenant_addr", None)
        if not isinstance(value, str):
            raise ValueError(f"unknown service: {service!r}")
        return None if value == TENANT_LISTENER_OFF else value

    def tls_dir(self) -> Path | None:
        """Where the mesh's certificates are, or None for plaintext (see ``certs_dir``)."""
        if self.certs_dir == "off":
            return None
        if self.certs_dir:
            return Path(self.certs_dir)
        default = self.data_dir / "certs"
        return default if (default / "ca.pem").exists() else None

    def database_url_for(self, service: str) -> str:
        """This service's database URL: the configured one, or a SQLite file under the data directory."""
        if self.database_url:
            return self.database_url.replace("{service}", service)
        return f"sqlite:///{(self.data_dir / service / f'{service}.db').resolve()}"

    def validate(self) -> None:
        """Fails fast on values that can't work; called by load_settings."""
        for name in SERVICE_NAMES:
            for what, address in (("", self.address_of(name)), ("_TENANT", self.tenant_address_of(name))):
                if address is not None:
                    try:
                        parse_address(address)
                    except ValueError as exc:
                        raise ValueError(f"AIDC_{name.upper()}{what}_ADDR: {exc}") from None
            # Both listeners bind on AIDC_HOST: one port cannot take both (no SO_REUSEPORT); name the setting at fault.
            tenant = self.tenant_address_of(name)
            if tenant is not None and parse_address(tenant)[1] == parse_address(self.address_of(name))[1]:
                raise ValueError(f"AIDC_{name.upper()}_TENANT_ADDR has the port of AIDC_{name.upper()}_ADDR")
        if self.client_auth not in ("require", "none"):
            raise ValueError(f"AIDC_CLIENT_AUTH must be 'require' or 'none', not {self.client_auth!r}")
        if self.max_message_bytes <= 0:
            raise ValueError("AIDC_MAX_MESSAGE_BYTES must be positive")
        if self.revocation_refresh_seconds <= 0:
            raise ValueError("AIDC_REVOCATION_REFRESH_SECONDS must be positive")
        if self.revocation_max_stale_seconds < self.revocation_refresh_seconds:
            raise ValueError("AIDC_REVOCATION_MAX_STALE_SECONDS must be at least AIDC_REVOCATION_REFRESH_SECONDS")
        if self.advertise_addr:
            try:
                parse_address(self.advertise_addr)
            except ValueError as exc:
                raise ValueError(f"AIDC_ADVERTISE_ADDR: {exc}") from None
        if self.leader_lease_seconds <= 0:
            raise ValueError("AIDC_LEADER_LEASE_SECONDS must be positive")
        if self.metrics_addr not in ("", "off"):
            try:
                parse_address(self.metrics_addr)
            except ValueError as exc:
                raise ValueError(f"AIDC_METRICS_ADDR must be host:port, empty or 'off': {exc}") from None
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"AIDC_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {self.log_level!r}")


@dataclass(frozen=True)
class ObjectStoreConnection:
    """Where the object store (S3 API) is and the credentials to it: the platform supervisor starts SeaweedFS there
    and passes them to every service; storage keeps tenants' objects there, serving an S3 model repository (which
    Triton's own S3 client reads with the same AWS_* credentials)."""

    s3_endpoint: str = setting("127.0.0.1:50070", "S3 endpoint (host:port) of the object store (SeaweedFS here).")
    aws_access_key_id: str = setting(
        "",
        "S3 access key; empty means generate one on first `aidc up` (<data_dir>/s3/credentials.json).",
        env="AWS_ACCESS_KEY_ID",
    )
    aws_secret_access_key: str = setting(
        "", "S3 secret key; empty means generate one with the access key.", env="AWS_SECRET_ACCESS_KEY"
    )

    def check_object_store_connection(self) -> None:
        """Raises ValueError for an endpoint that is not host:port or only one of the two keys."""
        try:
            parse_address(self.s3_endpoint)
        except ValueError as exc:
            raise ValueError(f"AIDC_S3_ENDPOINT: {exc}") from None
        if bool(self.aws_access_key_id) != bool(self.aws_secret_access_key):
            raise ValueError("set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither")


@dataclass(frozen=True)
class ObjectStoreSettings(MeshSettings, ObjectStoreConnection):
    """MeshSettings plus the object store: its connection and how each service talks to it."""

    storage_s3_secure: bool = setting(False, "Talk HTTPS to the object store.")
    storage_s3_ca_file: str = setting("", "CA bundle (PEM) trusted for the object store's TLS; empty: system CAs.")
    storage_s3_region: str = setting("", "S3 region; empty lets the SDK discover it.")
    storage_s3_timeout_seconds: float = setting(
        10.0, "Connect/read timeout of one S3 request; an unreachable object store fails calls after this."
    )

    def validate(self) -> None:
        super().validate()
        self.check_object_store_connection()
        if self.storage_s3_timeout_seconds <= 0:
            raise ValueError("AIDC_STORAGE_S3_TIMEOUT_SECONDS must be positive")


def _env_name(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("env") or f"AIDC_{f.name.upper()}"


def parse_flag(raw: str, env: str) -> bool:
    """A true/false setting's value (1/0, true/false, yes/no, on/off); ValueError naming ``env`` otherwise."""
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{env}={raw!r}: expected true/false")


def _convert(raw: str, kind: Any, env: str) -> Any:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kinds = [k for k in typing.get_args(kind) if k is not type(None)]
        return _convert(raw, kinds[0], env) if raw else None
    if kind is bool:
        return parse_flag(raw, env)
    try:
        if kind in (int, float, str, Path):
            return kind(raw)
        if typing.get_origin(kind) is tuple:
            return tuple(item.strip() for item in raw.split(",") if item.strip())
    except ValueError as exc:
        raise ValueError(f"{env}={raw!r}: {exc}") from None
    raise TypeError(f"unsupported settings type {kind!r} for {env}")


def load_settings(cls: type[_S], env: Mapping[str, str] | None = None) -> _S:
    """Builds a settings dataclass from the environment, failing fast with a clear message on bad values."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = _env_name(f)
        if name in env:
            values[f.name] = _convert(env[name], hints[f.name], name)
    settings = cls(**values)
    validate = getattr(settings, "validate", None)
    if validate is not None:
        validate()
    return settings


def describe_settings(cls: type) -> list[Setting]:
    """Every variable a settings class reads, with its default and documentation."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else ""
        if isinstance(default, tuple):
            default = ",".join(str(d) for d in default)
        out.append(Setting(env=_env_name(f), default=str(default), doc=f.metadata.get("doc", "")))
    return out


def check_master_key(value: str, env_name: str) -> None:
    """Fails fast unless ``value`` is empty or base64 of exactly 32 bytes."""
    if not value:
        return
    try:
        key = base64.b64decode(value, validate=True)
    except ValueError:
        raise ValueError(f"{env_name} is not valid base64") from None
    if len(key) != 32:
        raise ValueError(f"{env_name} must decode to 32 bytes")


def master_key(value: str, path: Path) -> bytes:
    """A service's 32-byte master key: the configured base64 ``value``, else the key file at ``path`` (created
    with mode 0600 on first use)."""
    if value:
        return base64.b64decode(value)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of the service won the race
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
    key = path.read_bytes()
    if len(key) != 32:
        raise ValueError(f"{path} must hold exactly 32 bytes")
    return key
