"""The serving service's connections to Triton: how it proves itself to Triton (``TritonAccess``), and the control
connection (explicit model loading, readiness, and probe inferences).

This is the only code that calls Triton's repository (model-control) API; the tenant-facing gateway never forwards
those RPCs. Triton is not a mesh service and carries no tenant credentials, but only the serving service may call it:

* ``aidc up``: Triton's gRPC endpoint requires mutual TLS with certificates of a CA of its own, made fresh by every
  ``aidc up`` (its key is not kept), whose one client certificate is in the platform user's private data directory
  (AIDC_TRITON_TLS_DIR). Its HTTP endpoint is off. A header secret would not do here: Triton takes it on its
  command line, which every local user can read (/proc/<pid>/cmdline).
* a cluster: Triton's restricted-protocol feature (``--grpc-restricted-protocol``) with a secret from a Kubernetes
  Secret, sent as a gRPC header (AIDC_TRITON_ACCESS_KEY_FILE), behind a NetworkPolicy admitting only serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.mesh.errors import AidcError, FailedPrecondition, Unavailable

__all__ = [
    "ACCESS_KEY_NAME",
    "RESTRICTED_PROTOCOLS",
    "TLS_FILES",
    "TritonAccess",
    "TritonControl",
    "restricted_protocol_flags",
]

#: The key of Triton's restricted-protocol setting (``--grpc-restricted-protocol=<protocols>:<key>=<secret>``).
ACCESS_KEY_NAME = "aidc-triton-key"
#: Triton expects a restricted key in gRPC metadata under this prefix.
_GRPC_KEY_PREFIX = "triton-grpc-protocol-"
#: Every protocol Triton 2.51 can restrict but health (a kubelet probes that, and it tells nothing).
RESTRICTED_PROTOCOLS = (
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
#: Files of AIDC_TRITON_TLS_DIR: Triton's CA, the client certificate and its key.
TLS_FILES = ("ca.pem", "client.pem", "client-key.pem")

_UNREACHABLE = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


@dataclass(frozen=True)
class TritonAccess:
    """Triton's address and how to be let in: mutual TLS with the files in ``tls_dir``, and/or ``access_key`` sent
    as the restricted-protocol header; neither: plaintext, no header (a Triton that admits anyone)."""

    address: str
    tls_dir: Path | None = None
    access_key: str = ""

    @classmethod
    def from_files(cls, address: str, tls_dir: str = "", access_key_file: str = "") -> TritonAccess:
        key = Path(access_key_file).read_text().strip() if access_key_file else ""
        return cls(address, Path(tls_dir) if tls_dir else None, key)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call to Triton carries besides its own metadata."""
        return ((_GRPC_KEY_PREFIX + ACCESS_KEY_NAME, self.access_key),) if self.access_key else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls_dir is None:
            return None
        ca, cert, key = ((self.tls_dir / name).read_bytes() for name in TLS_FILES)
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def channel(self, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        credentials = self.credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(self.address, options=list(options))
        return grpc.aio.secure_channel(self.address, credentials, options=list(options))


def restricted_protocol_flags(secret: str) -> tuple[str, ...]:
    """Triton's flags admitting only callers that send ``secret`` (TritonAccess.metadata) to anything but health,
    on gRPC and HTTP: how a cluster's Triton runs (deploy/k8s/base/triton.yaml)."""
    protocols = ",".join(RESTRICTED_PROTOCOLS)
    return (
        f"--grpc-restricted-protocol={protocols}:{ACCESS_KEY_NAME}={secret}",
        f"--http-restricted-api={protocols}:{ACCESS_KEY_NAME}={secret}",
    )


def _reason(error: InferenceServerException) -> str:
    return str(error.message() or error).strip()


def _translate(error: InferenceServerException, doing: str) -> AidcError:
    """Triton being unreachable is UNAVAILABLE (retry later); anything else is the model's fault."""
    if error.status() in _UNREACHABLE:
        return Unavailable(f"Triton is unavailable while {doing}: {_reason(error)}")
    return FailedPrecondition(f"Triton refused {doing}: {_reason(error)}")


class TritonControl:
    """Load, unload, readiness and probe calls against one Triton server."""

    def __init__(self, access: TritonAccess, timeout_seconds: float = 300.0) -> None:
        self._client = triton_aio.InferenceServerClient(access.address, creds=access.credentials())
        self._headers = dict(access.metadata)
        self._timeout = timeout_seconds

    async def close(self) -> None:
        await self._client.close()

    async def live(self) -> bool:
        try:
            return bool(await self._client.is_server_live(headers=self._headers, client_timeout=2.0))
        except InferenceServerException:
            return False

    async def ready(self, name: str, version: int) -> bool:
        """Whether ``version`` of model ``name`` is loaded and ready (False when Triton is unreachable)."""
        try:
            return bool(
                await self._client.is_model_ready(name, str(version), headers=self._headers, client_timeout=2.0)
            )
        except InferenceServerException:
            return False

    async def load(self, names: Sequence[str]) -> None:
        """Loads (or reloads, keeping the old model serving until the new one is ready) each model in order."""
        for name in names:
            try:
                await self._client.load_model(name, headers=self._headers, client_timeout=self._timeout)
            except InferenceServerException as error:
                raise _translate(error, f"loading {name}") from None

    async def unload(self, names: Sequence[str]) -> None:
        """Unloads each model and the models it is built from (an ensemble's steps); Triton lets in-flight requests
        finish; a model it doesn't have is fine."""
        for name in names:
            try:
                await self._client.unload_model(
                    name, unload_dependents=True, headers=self._headers, client_timeout=self._timeout
                )
            except InferenceServerException as error:
                if error.status() in _UNREACHABLE:
                    raise _translate(error, f"unloading {name}") from None

    async def infer(self, name: str, version: int, inputs: list[Any], outputs: Sequence[str]) -> Any:
        """One inference against a specific version (the rollout's probe)."""
        requested = [triton_aio.InferRequestedOutput(output) for output in outputs]
        try:
            return await self._client.infer(
                name,
                inputs,
                model_version=str(version),
                outputs=requested,
                headers=self._headers,
                client_timeout=min(self._timeout, 60.0),
            )
        except InferenceServerException as error:
            raise _translate(error, f"the probe inference of {name} version {version}") from None
