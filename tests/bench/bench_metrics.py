"""What Prometheus metrics cost on the hot path, measured with and without them in the same run (goal: at most 3 %
added to the p50):

* the CheckPermission RPC on loopback: two auth processes side by side, one recording metrics and serving /metrics
  (``AIDC_METRICS_ADDR`` set), one with ``AIDC_METRICS_ADDR=off`` (no interceptor, no-op children), called in
  alternation by one client;
* an inference through the gateway at concurrency 1: two gateway processes in front of the same Triton (the tiny
  sample classifier, about 1.5 ms in Triton, so the gateway's own cost shows in full), with and without metrics.

Calls alternate one by one between the two targets (the order flipping every pair), so both see the same machine
noise at the same moments; the report gives each target's p50 over all its calls and the added share, and the same
per tenth of the run (its spread shows the noise). Run with `python -m tests.bench.bench_metrics [calls]`.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
from services.mesh.metrics import MetricsInterceptor
from tests.bench.bench_auth import auth_service
from tests.bench.bench_serving import (
    TRITON_NAME,
    Target,
    _caller,
    _start_gateway,
    _wait_answering,
    _without_tracing,
    _write_sample,
    start_auth,
)
from tests.conftest import free_port, stop_process, wait_serving
from tests.serving.triton import TritonProcess

_CHECK = pb.CheckPermissionRequest(check=pb.PermissionCheck(tenant="platform", resource="tenants", action="read"))
_PARTS = 10


def _report(title: str, on: list[float], off: list[float], unit: str, scale: float) -> None:
    """``on``/``off``: seconds per call, in call order (pairs measured back to back)."""
    p50_on, p50_off = statistics.median(on) * scale, statistics.median(off) * scale
    size = len(on) // _PARTS
    parts = [
        100 * (statistics.median(on[i : i + size]) / statistics.median(off[i : i + size]) - 1)
        for i in range(0, size * _PARTS, size)
    ]
    print(f"\n{title}: {len(on)} calls to each, alternating")
    print(f"  p50 with metrics {p50_on:.1f} {unit}, without {p50_off:.1f} {unit}")
    print(f"  added: {100 * (p50_on / p50_off - 1):+.2f} % (goal <= 3 %)")
    print(f"  added per tenth of the run: {' '.join(f'{v:+.1f}' for v in parts)} %")


async def _alternate(
    on: Callable[[], Awaitable[object]], off: Callable[[], Awaitable[object]], calls: int
) -> tuple[list[float], list[float]]:
    loop = asyncio.get_running_loop()
    timed: dict[bool, list[float]] = {True: [], False: []}
    for i in range(calls):
        for first in (True, False) if i % 2 == 0 else (False, True):
            call = on if first else off
            start = loop.time()
            await call()
            timed[first].append(loop.time() - start)
    return timed[True], timed[False]


async def bench_check_permission(calls: int) -> None:
    async with (
        auth_service(AIDC_METRICS_ADDR=f"127.0.0.1:{free_port()}") as (measured, metadata_on),
        auth_service(AIDC_METRICS_ADDR="off") as (plain, metadata_off),
    ):

        def on() -> Awaitable[object]:
            return measured.stub.CheckPermission(_CHECK, metadata=metadata_on)

        def off() -> Awaitable[object]:
            return plain.stub.CheckPermission(_CHECK, metadata=metadata_off)

        await _alternate(on, off, 500)  # warm up: connections, caches, the decision memo
        with_metrics, without = await _alternate(on, off, calls)
    _report("CheckPermission RPC on loopback", with_metrics, without, "us", 1e6)


def bench_gateway(calls: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _write_sample(work / "models")
        triton = TritonProcess(work / "models", work / "triton")
        triton.argv = _without_tracing(triton.argv)
        triton.start()
        processes: list[subprocess.Popen[bytes]] = []
        try:
            with triton.client() as control:
                control.load_model(TRITON_NAME, headers=triton.headers)
            env, token = start_auth(work, triton, f"bench/sample={TRITON_NAME}:1", processes)
            bearer = {"authorization": f"Bearer {token}"}
            targets = {}
            for name, metrics in (("on", f"127.0.0.1:{free_port()}"), ("off", "off")):
                address = f"127.0.0.1:{free_port()}"
                gateway_env = {**env, "AIDC_SERVING_ADDR": address, "AIDC_METRICS_ADDR": metrics}
                processes.append(_start_gateway(gateway_env, work / f"gateway-{name}.log"))
                wait_serving(address, process=processes[-1])
                targets[name] = Target(f"gateway, metrics {name}", address, "sample", bearer)
                _wait_answering(targets[name], processes[-1])
            callers = {name: _caller(target) for name, target in targets.items()}
            timed: dict[str, list[float]] = {"on": [], "off": []}
            for i in range(calls + 100):  # the first 100 pairs warm up
                for name in ("on", "off") if i % 2 == 0 else ("off", "on"):
                    start = time.perf_counter()
                    callers[name][1]()
                    if i >= 100:
                        timed[name].append(time.perf_counter() - start)
            for client, _ in callers.values():
                client.close()
        finally:
            for process in processes:
                stop_process(process)
            triton.stop()
    _report("Inference through the gateway at concurrency 1", timed["on"], timed["off"], "ms", 1e3)


async def bench_interceptor(calls: int = 200_000) -> None:
    """The metrics interceptor's own cost per unary RPC, in process, without a network: the noise-free figure the
    two measurements above bound from above."""

    class Details:
        method = "/bench.v1.Bench/Call"
        invocation_metadata = ()

    async def behavior(request: object, context: object) -> object:
        return request

    wrapped = MetricsInterceptor().decorate(behavior, False, False, Details())  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    best: dict[str, float] = {}
    for _ in range(5):
        for name, call in (("bare", behavior), ("with metrics", wrapped)):
            start = loop.time()
            for _ in range(calls // 5):
                await call(None, None)
            best[name] = min(best.get(name, float("inf")), (loop.time() - start) / (calls // 5))
    added = (best["with metrics"] - best["bare"]) * 1e6
    print(f"\nThe interceptor itself: {added:.2f} us per unary RPC (best of 5 x {calls // 5} calls, in process)")


def main(calls: int) -> None:
    asyncio.run(bench_interceptor())
    asyncio.run(bench_check_permission(calls))
    bench_gateway(calls)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4000)
