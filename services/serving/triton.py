"""The serving service's control connection to Triton: explicit model loading, readiness, and probe inferences.

This is the only code that calls Triton's repository (model-control) API; the tenant-facing gateway never forwards
those RPCs. Triton is not a mesh service: the connection is plaintext to its loopback or cluster-internal address
and carries no tenant credentials.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.mesh.errors import AidcError, FailedPrecondition, Unavailable

__all__ = ["TritonControl"]

_UNREACHABLE = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


def _reason(error: InferenceServerException) -> str:
    return str(error.message() or error).strip()


def _translate(error: InferenceServerException, doing: str) -> AidcError:
    """Triton being unreachable is UNAVAILABLE (retry later); anything else is the model's fault."""
    if error.status() in _UNREACHABLE:
        return Unavailable(f"Triton is unavailable while {doing}: {_reason(error)}")
    return FailedPrecondition(f"Triton refused {doing}: {_reason(error)}")


class TritonControl:
    """Load, unload, readiness and probe calls against one Triton server."""

    def __init__(self, address: str, timeout_seconds: float = 300.0) -> None:
        self._client = triton_aio.InferenceServerClient(address)
        self._timeout = timeout_seconds

    async def close(self) -> None:
        await self._client.close()

    async def live(self) -> bool:
        try:
            return bool(await self._client.is_server_live(client_timeout=2.0))
        except InferenceServerException:
            return False

    async def ready(self, name: str, version: int) -> bool:
        """Whether ``version`` of model ``name`` is loaded and ready (False when Triton is unreachable)."""
        try:
            return bool(await self._client.is_model_ready(name, str(version), client_timeout=2.0))
        except InferenceServerException:
            return False

    async def load(self, names: Sequence[str]) -> None:
        """Loads (or reloads, keeping the old model serving until the new one is ready) each model in order."""
        for name in names:
            try:
                await self._client.load_model(name, client_timeout=self._timeout)
            except InferenceServerException as error:
                raise _translate(error, f"loading {name}") from None

    async def unload(self, names: Sequence[str]) -> None:
        """Unloads each model and the models it is built from (an ensemble's steps); Triton lets in-flight requests
        finish; a model it doesn't have is fine."""
        for name in names:
            try:
                await self._client.unload_model(name, unload_dependents=True, client_timeout=self._timeout)
            except InferenceServerException as error:
                if error.status() in _UNREACHABLE:
                    raise _translate(error, f"unloading {name}") from None

    async def infer(self, name: str, version: int, inputs: list[Any], outputs: Sequence[str]) -> Any:
        """One inference against a specific version (the rollout's probe)."""
        requested = [triton_aio.InferRequestedOutput(output) for output in outputs]
        try:
            return await self._client.infer(
                name, inputs, model_version=str(version), outputs=requested, client_timeout=min(self._timeout, 60.0)
            )
        except InferenceServerException as error:
            raise _translate(error, f"the probe inference of {name} version {version}") from None
