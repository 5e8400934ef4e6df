"""Benchmark of authorization: cached decisions, the CheckPermission RPC on loopback, and enforcement with
10,000 policy lines, each against a baseline measured in the same run (plain pycasbin / a bare gRPC echo).

Run with `make bench` (or `python -m tests.bench.bench_auth`). Absolute times on a shared machine are noisy;
the ratios are what to compare.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import casbin
import grpc

from services.auth.client import AuthClient
from services.auth.core.policy import CASBIN_MODEL, PolicyEngine, role_policy_lines
from services.mesh.authz import CachedPermissionChecker
from services.mesh.channels import create_channel
from services.mesh.config import MeshSettings, load_settings
from services.mesh.identity import Principal
from tests.conftest import first_admin_login, free_port, service_env, start_service_process, stop_process, wait_serving


def _time_sync(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


async def _time_async(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - start)
    return out


def _p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def _policy_lines(target: int) -> list[tuple[str, ...]]:
    lines: list[tuple[str, ...]] = []
    tenant = 0
    while len(lines) < target:
        name = f"tenant-{tenant:04d}"
        lines += role_policy_lines(name)
        lines += [("g", f"user:{name}/u{i}", "developer", name) for i in range(5)]
        tenant += 1
    return lines[:target]


class _ListAdapter(casbin.persist.Adapter):  # type: ignore[misc]
    def __init__(self, lines: list[tuple[str, ...]]) -> None:
        self._lines = lines

    def load_policy(self, model: object) -> None:
        for line in self._lines:
            casbin.persist.load_policy_line(", ".join(line), model)


def bench_enforcement(report: list[tuple[str, float, float, str]]) -> None:
    lines = _policy_lines(10_000)
    query = ("user:tenant-0042/u3", "tenant-0042", "datasets", "write")
    ours = PolicyEngine(_ListAdapter(lines))
    assert ours.allowed(*query)
    model = casbin.model.Model()
    model.load_model_from_text(CASBIN_MODEL)
    plain = casbin.Enforcer(model, _ListAdapter(lines))
    assert plain.enforce(*query)
    # enforce() bypasses the auth service's decision memo: this is Casbin's indexed evaluation itself.
    ours_t = _time_sync(lambda: ours.enforce(*query), 2000)
    plain_t = _time_sync(lambda: plain.enforce(*query), 30)
    report.append(
        (
            "enforce, 10,000 policy lines (goal <= 1 ms)",
            _p50_us(ours_t),
            _p50_us(plain_t),
            "plain casbin.Enforcer",
        )
    )
    memo_t = _time_sync(lambda: ours.allowed(*query), 20_000)
    report.append(("  same, auth's memoized decision", _p50_us(memo_t), _p50_us(plain_t), "plain casbin.Enforcer"))


async def bench_cached_decision(report: list[tuple[str, float, float, str]]) -> None:
    lines = _policy_lines(10_000)
    engine = PolicyEngine(_ListAdapter(lines))

    class _Engine:
        async def check(self, subject: str, tenant: str, resource: str, action: str) -> bool:
            return engine.allowed(subject, tenant, resource, action)

    cached = CachedPermissionChecker(_Engine(), ttl_seconds=60)
    principal = Principal(subject="user:tenant-0042/u3", tenant="tenant-0042", kind="user")
    query = (principal, "tenant-0042", "datasets", "write")
    await cached.check(*query)
    plain_model = casbin.model.Model()
    plain_model.load_model_from_text(CASBIN_MODEL)
    small = casbin.Enforcer(plain_model, _ListAdapter(_policy_lines(10)))
    small_query = ("user:tenant-0000/u0", "tenant-0000", "tenants", "read")
    ours_t = await _time_async(lambda: cached.check(*query), 20_000)
    plain_t = _time_sync(lambda: small.enforce(*small_query), 2000)
    report.append(
        (
            "cached decision (goal <= 20 us)",
            _p50_us(ours_t),
            _p50_us(plain_t),
            "plain casbin.Enforcer, 10 lines",
        )
    )


async def bench_check_permission_rpc(report: list[tuple[str, float, float, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        address = f"127.0.0.1:{free_port()}"
        env = service_env(data, AIDC_AUTH_ADDR=address, AIDC_LOG_LEVEL="WARNING")
        process = start_service_process("auth", env, data / "auth.log")
        try:
            wait_serving(address, process=process)

            password = first_admin_login(address, data)
            settings = load_settings(MeshSettings, env)
            client = AuthClient(create_channel(address, settings))
            token = (await client.login("platform", "admin", password)).access_token
            metadata = (("authorization", f"Bearer {token}"),)
            from services.gen.aidc.auth.v1 import auth_service_pb2 as pb

            request = pb.CheckPermissionRequest(
                check=pb.PermissionCheck(tenant="platform", resource="tenants", action="read")
            )

            async def check() -> object:
                return await client.stub.CheckPermission(request, metadata=metadata)

            # Baseline: a bare grpc.aio echo of the same messages, no interceptors, same client process.
            echo_server = grpc.aio.server()
            handler = grpc.unary_unary_rpc_method_handler(
                _echo,
                request_deserializer=pb.CheckPermissionRequest.FromString,
                response_serializer=pb.CheckPermissionResponse.SerializeToString,
            )
            echo_server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),)
            )
            port = echo_server.add_insecure_port("127.0.0.1:0")
            await echo_server.start()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                echo = channel.unary_unary(
                    "/bench.Echo/Echo",
                    request_serializer=pb.CheckPermissionRequest.SerializeToString,
                    response_deserializer=pb.CheckPermissionResponse.FromString,
                )
                for _ in range(200):
                    await check()
                    await echo(request)
                ours_t, base_t = [], []
                for _ in range(10):  # interleaved rounds: both see the same machine noise
                    ours_t += await _time_async(check, 200)
                    base_t += await _time_async(lambda: echo(request), 200)
            await echo_server.stop(0)
            await client.close()
            report.append(
                (
                    "CheckPermission RPC p50 on loopback (goal <= 1 ms)",
                    _p50_us(ours_t),
                    _p50_us(base_t),
                    "bare grpc.aio echo",
                )
            )
        finally:
            stop_process(process)


async def _echo(request: object, context: object) -> object:
    from services.gen.aidc.auth.v1 import auth_service_pb2 as pb

    return pb.CheckPermissionResponse(allowed=True)


async def main() -> None:
    report: list[tuple[str, float, float, str]] = []
    bench_enforcement(report)
    await bench_cached_decision(report)
    await bench_check_permission_rpc(report)
    print(f"{'benchmark':<52} {'aidc p50':>12} {'baseline p50':>14} {'speed-up':>9}  baseline")
    for name, ours, base, label in report:
        print(f"{name:<52} {ours:>10.1f}us {base:>12.1f}us {base / ours:>8.2f}x  {label}")


if __name__ == "__main__":
    asyncio.run(main())
