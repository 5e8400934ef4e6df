"""What Prometheus metrics cost on the hot path, measured with and without them in the same run (goal: at most 3 %
added to the p50):

* the CheckPermission RPC on loopback: two auth processes side by side, one recording metrics and serving /metrics
  (``AIDC_METRICS_ADDR`` set), one with ``AIDC_METRICS_ADDR=off`` (no interceptor, no-op children), called in
  interleaved rounds by one client;
* an inference through the gateway at concurrency 1: two gateway processes in front of the same Triton (the tiny
  sample classifier, about 1.5 ms in Triton, so the gateway's own cost shows in full), with and without metrics.

Each round measures both targets back to back (in alternating order) so both see the same machine noise; the report
gives the median of the rounds' p50s and the added share. Run with `python -m tests.bench.bench_metrics [rounds]`.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
from tests.bench.bench_auth import auth_service
from tests.bench.bench_serving import (
    TRITON_NAME,
    Target,
    _start_gateway,
    _tenant_token,
    _wait_answering,
    _without_tracing,
    _write_sample,
    latencies,
)
from tests.conftest import free_port, service_env, start_service_process, stop_process, wait_serving
from tests.serving.triton import TritonProcess

CHECKS_PER_ROUND = 300
INFERENCES_PER_ROUND = 300
_CHECK = pb.CheckPermissionRequest(check=pb.PermissionCheck(tenant="platform", resource="tenants", action="read"))


async def _p50_us(call: Callable[[], Awaitable[object]], n: int) -> float:
    loop = asyncio.get_running_loop()
    samples = []
    for _ in range(n):
        start = loop.time()
        await call()
        samples.append(loop.time() - start)
    return statistics.median(samples) * 1e6


def _report(title: str, with_metrics: list[float], without: list[float], unit: str) -> None:
    on, off = statistics.median(with_metrics), statistics.median(without)
    added = [100 * (a / b - 1) for a, b in zip(with_metrics, without, strict=True)]
    print(f"\n{title}, {len(added)} interleaved rounds")
    print(f"  with metrics    {' '.join(f'{v:8.1f}' for v in with_metrics)}  {unit}")
    print(f"  without metrics {' '.join(f'{v:8.1f}' for v in without)}  {unit}")
    print(
        f"  p50 with {on:.1f} {unit}, without {off:.1f} {unit}: added {100 * (on / off - 1):+.2f} % "
        f"(rounds {min(added):+.1f} .. {max(added):+.1f} %, median {statistics.median(added):+.2f} %; goal <= 3 %)"
    )


async def bench_check_permission(rounds: int) -> None:
    async with (
        auth_service(AIDC_METRICS_ADDR=f"127.0.0.1:{free_port()}") as (measured, metadata_on),
        auth_service(AIDC_METRICS_ADDR="off") as (plain, metadata_off),
    ):
        targets = {
            "on": lambda: measured.stub.CheckPermission(_CHECK, metadata=metadata_on),
            "off": lambda: plain.stub.CheckPermission(_CHECK, metadata=metadata_off),
        }
        for call in targets.values():
            for _ in range(300):  # warm up: connections, caches, the decision memo
                await call()
        results: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(rounds):
            for name in ("on", "off") if i % 2 == 0 else ("off", "on"):
                results[name].append(await _p50_us(targets[name], CHECKS_PER_ROUND))
    _report("CheckPermission RPC p50 on loopback", results["on"], results["off"], "us")


def bench_gateway(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _write_sample(work / "models")
        triton = TritonProcess(work / "models", work / "triton")
        triton.argv = _without_tracing(triton.argv)
        triton.start()
        processes = []
        try:
            with triton.client() as control:
                control.load_model(TRITON_NAME, headers=triton.headers)
            data = work / "data"
            auth_address = f"127.0.0.1:{free_port()}"
            env = service_env(
                data,
                AIDC_AUTH_ADDR=auth_address,
                AIDC_BILLING_ADDR=f"127.0.0.1:{free_port()}",
                **triton.serving_env(),
                AIDC_CERTS_DIR="off",
                AIDC_LOG_LEVEL="WARNING",
                AIDC_SERVING_RATE_LIMIT_PER_SECOND="1000000",
                AIDC_SERVING_RATE_LIMIT_BURST="1000000",
                BENCH_ROUTES=f"bench/sample={TRITON_NAME}:1",
            )
            processes.append(start_service_process("auth", env, work / "auth.log"))
            wait_serving(auth_address, process=processes[-1])
            token = asyncio.run(_tenant_token(auth_address, data, env))
            bearer = {"authorization": f"Bearer {token}"}
            targets = {}
            for name, metrics in (("on", f"127.0.0.1:{free_port()}"), ("off", "off")):
                address = f"127.0.0.1:{free_port()}"
                gateway_env = {**env, "AIDC_SERVING_ADDR": address, "AIDC_METRICS_ADDR": metrics}
                processes.append(_start_gateway(gateway_env, work / f"gateway-{name}.log"))
                wait_serving(address, process=processes[-1])
                targets[name] = Target(f"gateway, metrics {name}", address, "sample", bearer)
                _wait_answering(targets[name], processes[-1])
            for target in targets.values():
                latencies(target, 100)  # warm up
            results: dict[str, list[float]] = {"on": [], "off": []}
            for i in range(rounds):
                for name in ("on", "off") if i % 2 == 0 else ("off", "on"):
                    samples = latencies(targets[name], INFERENCES_PER_ROUND)
                    results[name].append(statistics.median(samples) * 1e3)
        finally:
            for process in processes:
                stop_process(process)
            triton.stop()
    _report("Inference through the gateway, p50 at concurrency 1", results["on"], results["off"], "ms")


def main(rounds: int) -> None:
    asyncio.run(bench_check_permission(rounds))
    bench_gateway(rounds)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
