"""Every service starts as its own process and reports SERVING over gRPC health; SIGTERM stops each cleanly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.mesh.config import SERVICE_NAMES
from tests.conftest import free_port, service_env, start_service_process, stop_process, wait_serving
from tests.storage.seaweed import SeaweedFS


@pytest.mark.slow
def test_every_service_process_reports_serving(tmp_path: Path) -> None:
    addresses = {name: f"127.0.0.1:{free_port()}" for name in SERVICE_NAMES}
    s3 = SeaweedFS(tmp_path / "s3")  # storage is ready only once its object store answers
    s3.start()
    env = service_env(tmp_path / "data", **{f"AIDC_{n.upper()}_ADDR": a for n, a in addresses.items()}, **s3.env())
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in SERVICE_NAMES:
            processes[name] = start_service_process(name, env, tmp_path / f"{name}.log")
        for name in SERVICE_NAMES:
            wait_serving(addresses[name], timeout=60, process=processes[name])
        for name, address in addresses.items():
            with grpc.insecure_channel(address) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert status.status == health_pb2.HealthCheckResponse.SERVING, name
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                reply = next(
                    iter(
                        reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                            iter([request]), timeout=5
                        )
                    )
                )
                listed = {s.name for s in reply.list_services_response.service}
                assert "grpc.health.v1.Health" in listed, name
                if name == "auth":
                    assert "aidc.auth.v1.AuthService" in listed
    finally:
        for process in processes.values():
            stop_process(process)
        s3.stop()
    assert {name: p.returncode for name, p in processes.items()} == {name: 0 for name in SERVICE_NAMES}
