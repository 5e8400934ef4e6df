"""Benchmark of the mesh's request size limits: what the check adds to one RPC's server-side handling, against the
same handler without it, for a request type with nothing to bound, a maximal permission batch and a maximal usage
batch (1,000 events, each with a map to look into).

Run with `make bench` (or `python -m tests.bench.bench_request_limits`).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from google.protobuf.message import Message

from services.gen.aidc.auth.v1 import auth_service_pb2 as apb
from services.gen.aidc.billing.v1 import billing_service_pb2 as bpb
from services.mesh.interceptors import RequestLimitInterceptor


async def _handler(request: Any, context: Any) -> None:
    return None


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method


async def _per_call_us(behavior: Any, request: Message, calls: int = 2000, rounds: int = 7) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            await behavior(request, None)
        samples.append((time.perf_counter() - started) / calls)
    return statistics.median(samples) * 1e6


async def main() -> None:
    interceptor = RequestLimitInterceptor()
    cases = [
        (
            "CheckPermission (nothing to bound: not wrapped)",
            "/aidc.auth.v1.AuthService/CheckPermission",
            apb.CheckPermissionRequest(check=apb.PermissionCheck(tenant="acme")),
        ),
        (
            "BatchCheckPermission, 1,000 checks",
            "/aidc.auth.v1.AuthService/BatchCheckPermission",
            apb.BatchCheckPermissionRequest(checks=[apb.PermissionCheck(tenant="acme")] * 1000),
        ),
        (
            "RecordUsage, 1,000 events with 2 attributes",
            "/aidc.billing.v1.BillingService/RecordUsage",
            bpb.RecordUsageRequest(events=[bpb.UsageEvent(attributes={"a": "1", "b": "2"})] * 1000),
        ),
    ]
    print(f"{'request':<50} {'added per RPC':>14}")
    for name, method, request in cases:
        wrapped = interceptor.decorate(_handler, False, False, _Details(method))  # type: ignore[arg-type]
        await _per_call_us(wrapped, request, calls=200, rounds=1)
        bare, checked = await _per_call_us(_handler, request), await _per_call_us(wrapped, request)
        print(f"{name:<50} {checked - bare:>12.2f}us")


if __name__ == "__main__":
    asyncio.run(main())
