"""Typed clients of the serving service: ServingService (deployments) and the KServe v2 inference endpoint for
text classifiers (the CLI and tests use them; any Triton client works against the gateway too)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as kserve_pb
from tritonclient.grpc import service_pb2_grpc as kserve_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from services.gen.aidc.common.v1 import common_pb2
from services.gen.aidc.serving.v1 import serving_service_pb2 as pb
from services.gen.aidc.serving.v1 import serving_service_pb2_grpc
from services.mesh.client import ServiceClient
from services.serving.repository import LABELS_PARAMETER

__all__ = ["ServingClient", "TextClassifierClient", "Classification"]


class ServingClient(ServiceClient):
    """Typed calls to ServingService; errors arrive as services.mesh.errors types."""

    def __init__(self, channel: grpc.aio.Channel, **kwargs: float) -> None:
        # Deploy with wait=True lasts as long as loading and probing the model does.
        kwargs.setdefault("timeout_seconds", 300.0)
        super().__init__(channel, **kwargs)  # type: ignore[arg-type]
        self.stub = serving_service_pb2_grpc.ServingServiceStub(channel)

    async def deploy(
        self,
        model: str,
        *,
        tenant: str = "",
        version: int = 0,
        alias: str = "",
        instance_count: int = 0,
        max_batch_size: int | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> pb.Deployment:
        request = pb.DeployRequest(
            tenant=tenant,
            model=model,
            version=version,
            alias=alias,
            instance_count=instance_count,
            max_batch_size=max_batch_size,
            wait=wait,
        )
        # Deploying the same thing again changes nothing, so retrying is safe.
        return (await self._unary(self.stub.Deploy, request, idempotent=True, timeout=timeout)).deployment

    async def undeploy(self, model: str, tenant: str = "") -> pb.Deployment:
        request = pb.UndeployRequest(tenant=tenant, model=model)
        return (await self._unary(self.stub.Undeploy, request)).deployment

    async def get_deployment(self, model: str, tenant: str = "") -> pb.Deployment:
        request = pb.GetDeploymentRequest(tenant=tenant, model=model)
        return (await self._unary(self.stub.GetDeployment, request, idempotent=True)).deployment

    async def list_deployments(
        self, tenant: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[pb.Deployment], str]:
        request = pb.ListDeploymentsRequest(
            tenant=tenant, page=common_pb2.PageRequest(page_size=page_size, page_token=page_token)
        )
        response = await self._unary(self.stub.ListDeployments, request, idempotent=True)
        return list(response.deployments), response.page.next_page_token


@dataclass(frozen=True)
class Classification:
    text: str
    label: str
    #: Class name -> softmax probability.
    probabilities: dict[str, float]
    #: The model version that answered (Triton's answer names it).
    model_version: str = ""


class TextClassifierClient(ServiceClient):
    """Raw text in, labels out, through the gateway's ModelInfer (tokenization runs inside Triton)."""

    def __init__(self, channel: grpc.aio.Channel, **kwargs: float) -> None:
        super().__init__(channel, **kwargs)  # type: ignore[arg-type]
        self.stub = kserve_grpc.GRPCInferenceServiceStub(channel)

    async def labels(self, model: str) -> list[str]:
        """The model's class names, from its config (output LOGITS carries them in logit order)."""
        config = await self._unary(self.stub.ModelConfig, kserve_pb.ModelConfigRequest(name=model), idempotent=True)
        labels = config.config.parameters.get(LABELS_PARAMETER)
        return list(json.loads(labels.string_value)) if labels is not None and labels.string_value else []

    async def classify(
        self, model: str, texts: list[str], version: str = "", batch_size: int = 8
    ) -> list[Classification]:
        """Classifies ``texts`` in requests of at most ``batch_size`` rows (a deployment's max_batch_size bounds the
        rows of one request), sent concurrently; results in the order of ``texts``."""
        names = await self.labels(model)
        chunks = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
        answers = await asyncio.gather(*(self._classify(model, chunk, version, names) for chunk in chunks))
        return [result for answer in answers for result in answer]

    async def _classify(self, model: str, texts: list[str], version: str, names: list[str]) -> list[Classification]:
        request = kserve_pb.ModelInferRequest(model_name=model, model_version=version)
        tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts), 1])
        del tensor  # the contents travel in raw_input_contents
        request.raw_input_contents.append(serialize_byte_tensor(np.array(texts, dtype=np.object_)).item())
        request.outputs.add(name="LOGITS")
        request.outputs.add(name="LABEL")
        response = await self._unary(self.stub.ModelInfer, request)
        outputs = {o.name: i for i, o in enumerate(response.outputs)}
        logits = np.frombuffer(response.raw_output_contents[outputs["LOGITS"]], dtype=np.float32)
        logits = logits.reshape(len(texts), -1)
        label_bytes = deserialize_bytes_tensor(response.raw_output_contents[outputs["LABEL"]])
        results = []
        for text, row, label in zip(texts, logits, label_bytes, strict=True):
            exp = np.exp(row - row.max())
            probs = exp / exp.sum()
            keys = names if len(names) == len(row) else [str(i) for i in range(len(row))]
            probabilities = {k: float(p) for k, p in zip(keys, probs, strict=True)}
            results.append(Classification(text, label.decode(), probabilities, response.model_version))
        return results
