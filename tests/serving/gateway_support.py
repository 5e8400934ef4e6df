"""The inference gateway's test bench: a real Triton serving tiny python-backend models, real auth and billing
in this process (with mutual TLS, the only way a service may ask billing anything), a real collector receiving
Triton's spans, and gateways built by ``build_gateway`` in real MeshServers on real ports.

Tenants acme and globex with one user per role come from tests/storage/conftest.py. Clients are tritonclient's,
over TLS with the CLI's certificate plus a bearer token, exactly as a tenant would connect.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio

from services.auth.config import AuthSettings
from services.mesh.certs import init_certificates
from services.mesh.security import mesh_security, secured_server
from services.mesh.server import MeshServer
from services.serving.config import ServingSettings
from services.serving.gateway import GATEWAY_PERMISSIONS, InferenceGateway, build_gateway
from services.serving.routes import Route, Routes, triton_model_name
from tests.billing.conftest import RunningBilling, start_billing
from tests.collector.harness import CollectorProcess, running_collector
from tests.conftest import RunningAuth, free_port, start_auth, tenant_addresses
from tests.serving.triton import TritonProcess
from tests.storage.conftest import user_tokens

__all__ = ["GatewayBench", "RunningGateway", "gateway_bench", "write_model", "ADD_ONE_MODEL", "UNLOADED_MODEL"]

_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 8
dynamic_batching {{ max_queue_delay_microseconds: 500 }}
input [ {{ name: "INPUT", data_type: TYPE_FP32, dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT", data_type: TYPE_FP32, dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
parameters {{ key: "delay_ms" value: {{ string_value: "{delay_ms}" }} }}
"""

#: FP32 "add one", optionally sleeping ``delay_ms`` per execution (to outlast a deadline). A slow model works as a model
#: honouring cancellation does: requests Triton marks cancelled (their caller gave up or its deadline passed) get a
#: CANCELLED error instead of compute; and it logs each request to ``<model dir>/executions`` ("running" as it starts,
#: "cancelled" when skipped), so a test can see Triton busy and what reached Triton.
ADD_ONE_MODEL = """
import json
import os
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.delay = int(parameters.get("delay_ms", {}).get("string_value", "0")) / 1000
        self.executions = os.path.join(args["model_repository"], "executions")

    def execute(self, requests):
        cancelled = [self.delay > 0 and request.is_cancelled() for request in requests]
        if self.delay:
            with open(self.executions, "a") as executions:
                executions.writelines("cancelled\\n" if c else "running\\n" for c in cancelled)
            if not all(cancelled):
                time.sleep(self.delay)
        responses = []
        for request, skipped in zip(requests, cancelled):
            if skipped:
                error = pb_utils.TritonError("the caller gave up", pb_utils.TritonError.CANCELLED)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            data = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", data + 1)]))
        return responses
"""


def write_model(repository: Path, triton_name: str, version: str = "1", delay_ms: int = 0) -> None:
    """Writes the add-one model as ``<repository>/<triton_name>/<version>/model.py``."""
    (repository / triton_name / version).mkdir(parents=True, exist_ok=True)
    (repository / triton_name / "config.pbtxt").write_text(_CONFIG.format(name=triton_name, delay_ms=delay_ms))
    (repository / triton_name / version / "model.py").write_text(ADD_ONE_MODEL)


@dataclass
class RunningGateway:
    """A gateway on a real port, alone in its MeshServer (as the serving service would run it, minus deployments)."""

    server: MeshServer
    gateway: InferenceGateway
    settings: ServingSettings
    address: str

    async def stop(self, flush_timeout: float = 5.0) -> None:
        await self.server.stop(0)
        await self.gateway.close(flush_timeout)


@dataclass
class GatewayBench:
    """Everything the gateway needs, started once per test module."""

    work_dir: Path
    certs: Path
    collector: CollectorProcess
    triton: TritonProcess
    auth: RunningAuth
    billing: RunningBilling
    tokens: dict[str, str]
    routes: Routes

    def serving_settings(self, **overrides: str) -> ServingSettings:
        """Settings of one gateway: its own data directory (usage outbox), this bench's services."""
        env = {
            "AIDC_DATA_DIR": str(self.work_dir / f"gateway-{free_port()}"),
            "AIDC_CERTS_DIR": str(self.certs),
            "AIDC_AUTH_ADDR": self.auth.address,
            "AIDC_BILLING_ADDR": self.billing.address,
            "AIDC_SERVING_ADDR": f"127.0.0.1:{free_port()}",
            **self.triton.serving_env(),
            "AIDC_SERVING_METERING_INTERVAL_SECONDS": "0.5",
            **tenant_addresses(),
            **overrides,
        }
        return ServingSettings.from_env(env)

    async def start_gateway(self, routes: Routes | None = None, **overrides: str) -> RunningGateway:
        """A fresh gateway (its own caches, meter and outbox) over ``routes`` (default: the bench's)."""
        settings = self.serving_settings(**overrides)
        security = mesh_security(settings, "serving")
        gateway = build_gateway(settings, self.routes if routes is None else routes, security)
        server = secured_server(
            "serving",
            settings,
            [gateway.registration()],
            GATEWAY_PERMISSIONS,
            readiness=gateway.triton_ready,
            security=security,
        )
        await gateway.start()
        await server.start()
        await server.wait_ready()
        return RunningGateway(server, gateway, settings, settings.serving_addr)

    def _tls(self) -> dict[str, object]:
        return {
            "ssl": True,
            "root_certificates": str(self.certs / "ca.pem"),
            "private_key": str(self.certs / "cli-key.pem"),
            "certificate_chain": str(self.certs / "cli.pem"),
        }

    def client(self, address: str) -> triton_aio.InferenceServerClient:
        """tritonclient's asyncio client to a gateway."""
        return triton_aio.InferenceServerClient(address, **self._tls())  # type: ignore[arg-type]

    def sync_client(self, address: str) -> triton_grpc.InferenceServerClient:
        """tritonclient's blocking client to a gateway (call it from a thread: the gateway runs on this loop)."""
        return triton_grpc.InferenceServerClient(address, **self._tls())  # type: ignore[arg-type]

    def headers(self, user: str) -> dict[str, str]:
        """The one thing a tenant adds to an existing Triton client: its bearer token ("acme/dev", ...)."""
        return {"authorization": f"Bearer {self.tokens[user]}"}


#: Models of the bench's Triton: (tenant, model, delay_ms); all at version 1, all loaded at start.
BENCH_MODELS = (("acme", "addone", 0), ("globex", "addone", 0), ("acme", "metered", 0), ("acme", "slow", 3000))
#: In the repository but never loaded (a tenant trying to load it through the gateway must fail).
UNLOADED_MODEL = triton_model_name("acme", "unloaded")


@contextlib.asynccontextmanager
async def gateway_bench(work_dir: Path) -> AsyncIterator[GatewayBench]:
    """Starts the bench's processes and services; stops them when the block ends."""
    certs = work_dir / "certs"
    init_certificates(certs)
    repository = work_dir / "models"
    routes = Routes()
    for tenant, model, delay_ms in BENCH_MODELS:
        write_model(repository, triton_model_name(tenant, model), delay_ms=delay_ms)
        routes.set(Route(tenant, model, triton_model_name(tenant, model), "1"))
    write_model(repository, UNLOADED_MODEL)
    with contextlib.ExitStack() as stack:
        collector = stack.enter_context(running_collector(work_dir / "traces-data"))
        triton = TritonProcess(repository, work_dir / "triton", collector_addr=f"127.0.0.1:{collector.port}")
        triton.start()
        stack.callback(triton.stop)
        with triton.client() as control:
            for tenant, model, _ in BENCH_MODELS:
                control.load_model(triton_model_name(tenant, model))
        auth_settings = AuthSettings.from_env(
            {
                "AIDC_DATA_DIR": str(work_dir / "auth-data"),
                "AIDC_AUTH_ADDR": f"127.0.0.1:{free_port()}",
                "AIDC_AUTH_ARGON2_TIME_COST": "1",
                "AIDC_AUTH_ARGON2_MEMORY_KIB": "1024",
                "AIDC_CERTS_DIR": str(certs),
                **tenant_addresses(),
            }
        )
        auth = await start_auth(auth_settings)
        try:
            billing = await start_billing(auth, work_dir / "billing-data", AIDC_CERTS_DIR=str(certs))
            try:
                tokens = await user_tokens(auth)
                yield GatewayBench(work_dir, certs, collector, triton, auth, billing, tokens, routes)
            finally:
                await billing.server.stop(0)
        finally:
            await auth.server.stop(0)
