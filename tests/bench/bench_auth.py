"""Benchmark of authorization: cached decisions, the CheckPermission RPC on loopback, and enforcement with
10,000 policy lines, each against a baseline measured in the same run (plain pycasbin / a bare gRPC echo).

The batch benchmark measures what one BatchCheckPermission of 1,000 distinct (never memoized) checks does to the
latency of single CheckPermission calls sent meanwhile by another client.

Run with `make bench` (or `python -m tests.bench.bench_auth`). Absolute times on a shared machine are noisy;
the ratios are what to compare.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import casbin
import grpc

from services.auth.client import AuthClient
from services.auth.core.policy import CASBIN_MODEL, PolicyEngine, role_policy_lines
from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
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


def bench_first_check_in_a_big_tenant(report: list[tuple[str, float, float, str]]) -> None:
    """A tenant's role graph is built at its first check (after every start): one tenant with 3,000 bindings."""
    lines = role_policy_lines("big") + [("g", f"user:big/u{i}", "developer", "big") for i in range(3000)]
    query = ("user:big/u42", "big", "datasets", "write")
    ours = PolicyEngine(_ListAdapter(lines))
    model = casbin.model.Model()
    model.load_model_from_text(CASBIN_MODEL)
    plain = casbin.Enforcer(model, _ListAdapter(lines))
    ours_t = _time_sync(lambda: ours.enforce(*query), 1)
    plain_t = _time_sync(lambda: plain.enforce(*query), 1)
    report.append(("first check, one tenant of 3,000 bindings", _p50_us(ours_t), _p50_us(plain_t), "plain casbin"))


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


@asynccontextmanager
async def auth_service(**extra_env: str) -> AsyncIterator[tuple[AuthClient, tuple[tuple[str, str]]]]:
    """The auth service as its own process (with ``extra_env``), a client of it and the platform admin's bearer
    metadata."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        address = f"127.0.0.1:{free_port()}"
        env = service_env(data, AIDC_AUTH_ADDR=address, AIDC_LOG_LEVEL="WARNING", **extra_env)
        process = start_service_process("auth", env, data / "auth.log")
        try:
            wait_serving(address, process=process)
            password = first_admin_login(address, data)
            client = AuthClient(create_channel(address, load_settings(MeshSettings, env)))
            token = (await client.login("platform", "admin", password)).access_token
            yield client, (("authorization", f"Bearer {token}"),)
            await client.close()
        finally:
            stop_process(process)


_SINGLE = pb.CheckPermissionRequest(check=pb.PermissionCheck(tenant="platform", resource="tenants", action="read"))


async def bench_check_permission_rpc(report: list[tuple[str, float, float, str]]) -> None:
    async with auth_service() as (client, metadata):

        async def check() -> object:
            return await client.stub.CheckPermission(_SINGLE, metadata=metadata)

        # Baseline: a bare grpc.aio echo of the same messages, no interceptors, same client process.
        echo_server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            _echo,
            request_deserializer=pb.CheckPermissionRequest.FromString,
            response_serializer=pb.CheckPermissionResponse.SerializeToString,
        )
        echo_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),))
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
                await echo(_SINGLE)
            ours_t, base_t = [], []
            for _ in range(10):  # interleaved rounds: both see the same machine noise
                ours_t += await _time_async(check, 200)
                base_t += await _time_async(lambda: echo(_SINGLE), 200)
        await echo_server.stop(0)
    report.append(
        ("CheckPermission RPC p50 on loopback (goal <= 1 ms)", _p50_us(ours_t), _p50_us(base_t), "bare grpc.aio echo")
    )


async def bench_batch_stall(report: list[tuple[str, float, float, str]]) -> None:
    """Single CheckPermission latency while 1,000-check batches run, against the same calls on an idle server."""
    async with auth_service() as (client, metadata):

        async def check() -> object:
            return await client.stub.CheckPermission(_SINGLE, metadata=metadata)

        for _ in range(100):
            await check()
        idle = await _time_async(check, 300)
        batch_seconds: list[float] = []
        during: list[float] = []
        for round_ in range(5):
            checks = [
                pb.PermissionCheck(
                    subject=f"user:t{round_}/u{i}", tenant=f"t{round_}-{i % 7}", resource="datasets", action="read"
                )
                for i in range(1000)
            ]
            batch = pb.BatchCheckPermissionRequest(checks=checks)
            started = time.perf_counter()
            call = asyncio.ensure_future(client.stub.BatchCheckPermission(batch, metadata=metadata))
            while not call.done():
                during += await _time_async(check, 1)
            await call
            batch_seconds.append(time.perf_counter() - started)
            await asyncio.sleep(0.2)
    print(
        f"batch of 1,000: p50 {statistics.median(batch_seconds) * 1e3:.1f} ms; concurrent single checks: "
        f"n={len(during)} p50 {_p50_us(during) / 1e3:.2f} ms max {max(during) * 1e3:.1f} ms "
        f"(idle p50 {_p50_us(idle) / 1e3:.2f} ms max {max(idle) * 1e3:.1f} ms)"
    )
    report.append(("CheckPermission p50 during a 1,000-check batch", _p50_us(during), _p50_us(idle), "idle"))
    report.append(("  same, max", max(during) * 1e6, max(idle) * 1e6, "idle max"))


async def _echo(request: object, context: object) -> object:
    return pb.CheckPermissionResponse(allowed=True)


async def main() -> None:
    report: list[tuple[str, float, float, str]] = []
    bench_enforcement(report)
    bench_first_check_in_a_big_tenant(report)
    await bench_cached_decision(report)
    await bench_check_permission_rpc(report)
    await bench_batch_stall(report)
    print(f"{'benchmark':<52} {'aidc p50':>12} {'baseline p50':>14} {'speed-up':>9}  baseline")
    for name, ours, base, label in report:
        print(f"{name:<52} {ours:>10.1f}us {base:>12.1f}us {base / ours:>8.2f}x  {label}")


if __name__ == "__main__":
    asyncio.run(main())
