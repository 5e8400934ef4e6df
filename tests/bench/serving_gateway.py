"""The inference gateway as its own process, for bench_serving: the real gateway (``build_gateway``) in the serving
service's secured MeshServer, run by ``run_service`` like every service (logging, telemetry, SIGTERM), with static
routes in place of the deployments core.

    BENCH_ROUTES="tenant/model=triton_name:version,..." python -m tests.bench.serving_gateway

With ``--bare`` it runs the floor instead: a grpc.aio server that forwards ModelInfer bytes to Triton and does
nothing else (no interceptors, telemetry, checks or metering), i.e. what any Python gRPC hop costs.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import grpc

from services.mesh.security import mesh_security, secured_server
from services.mesh.server import MeshServer, run_service
from services.serving.config import ServingSettings
from services.serving.gateway import GATEWAY_PERMISSIONS, build_gateway
from services.serving.routes import Route, Routes


def parse_routes(spec: str) -> Routes:
    """Routes from "tenant/model=triton_name:version" items separated by commas."""
    routes = Routes()
    for item in filter(None, spec.split(",")):
        name, _, target = item.partition("=")
        tenant, _, model = name.partition("/")
        triton_name, _, version = target.partition(":")
        routes.set(Route(tenant, model, triton_name, version))
    return routes


async def build(settings: ServingSettings) -> MeshServer:
    security = mesh_security(settings, "serving")
    gateway = build_gateway(settings, parse_routes(os.environ["BENCH_ROUTES"]), security)
    await gateway.start()
    return secured_server(
        "serving",
        settings,
        [gateway.registration()],
        GATEWAY_PERMISSIONS,
        readiness=gateway.triton_ready,
        on_stop=[gateway.close],
        security=security,
    )


async def serve_bare_proxy(settings: ServingSettings) -> None:
    """Forwards ModelInfer from ``serving_addr`` to Triton as bytes until cancelled."""
    access = settings.triton_access()
    channel = access.channel()
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", None, None)

    async def model_infer(request: bytes, context: Any) -> Any:
        return await infer(request, timeout=60, metadata=access.metadata)

    handler = grpc.unary_unary_rpc_method_handler(model_infer)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler}),)
    )
    server.add_insecure_port(settings.serving_addr)
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    if "--bare" in sys.argv:
        asyncio.run(serve_bare_proxy(ServingSettings.from_env()))
    else:
        run_service("serving", ServingSettings.from_env, build)
