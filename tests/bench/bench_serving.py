"""Benchmark of the inference gateway against Triton itself, in the same run, with the same model and client.

Triton (serving two text classifiers written by the live-repository writer: the tiny sample export, where a
request costs Triton about 1.5 ms so any proxy's cost shows in full, and MiniLM-L6 with an untrained head, a
realistic encoder), auth and the gateway each run as their own process; the client is tritonclient.grpc, one
blocking client per thread, sending the same request straight to Triton or through the gateway with a bearer
token, in interleaved rounds so both see the same noise:

* p50 latency at concurrency 1: the gateway's added milliseconds (goal <= 1 ms);
* throughput at concurrency 8: the gateway's share of Triton's own (goal >= 0.85).

A third target measured alongside is the floor: a bare grpc.aio proxy forwarding the same bytes with nothing else
(tests/bench/serving_gateway.py --bare), i.e. what any Python gRPC hop costs on this machine. The gateway's cost
above the floor is its own (the mesh's interceptors and telemetry, authorization, limits, metering).

The gateway runs as the serving service would (telemetry into the local span store, metering into its usage
outbox, per-tenant rate limit on), in dev mode: plaintext loopback, no billing process (budget checks fail open).
Triton admits only the platform: by default as `aidc up` runs it (mutual TLS with its own CA: the direct client and
the gateway present the platform's client certificate), with ``header`` as a cluster runs it (plaintext behind a
NetworkPolicy, the restricted-protocol secret sent as a header by every caller).
Triton runs without its OpenTelemetry tracing: Triton 2.51 crashes now and then under concurrent load with it on
(SIGSEGV or std::length_error in the python backend's execute; with or without a traceparent; fixed upstream after
2.51, triton-inference-server/server#7795 and #8144), which would end a run halfway.

Run with `python -m tests.bench.bench_serving [rounds] [tls|header]`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as triton_grpc

from services.auth.client import AuthClient
from services.cli.session import BearerToken
from services.mesh.channels import create_channel
from services.mesh.config import MeshSettings, load_settings
from services.serving.repository import DeploymentShape, ExportBundle, LiveRepository
from tests.conftest import (
    ROOT,
    first_admin_login,
    free_port,
    service_env,
    start_service_process,
    stop_process,
    wait_serving,
)
from tests.serving.triton import TritonProcess

SAMPLE = ROOT / "model_repository" / "sample"
TRITON_NAME = "bench__sample"
MINILM_NAME = "bench__minilm"
C1_REQUESTS = 300
C8_SECONDS = 3.0


@dataclass
class Target:
    """One way to reach the model: an address, the model name there, the headers to send, and the channel
    credentials (Triton itself wants the platform's client certificate, as `aidc up` runs it)."""

    label: str
    address: str
    model: str
    headers: dict[str, str]
    creds: grpc.ChannelCredentials | None = None


def _inputs() -> list[triton_grpc.InferInput]:
    text = triton_grpc.InferInput("TEXT", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"the service was quick and the answer was right"]], dtype=np.object_))
    return [text]


def _caller(target: Target) -> tuple[triton_grpc.InferenceServerClient, Callable[[], object]]:
    client = triton_grpc.InferenceServerClient(target.address, creds=target.creds)
    inputs = _inputs()
    outputs = [triton_grpc.InferRequestedOutput("LABEL")]
    return client, lambda: client.infer(target.model, inputs, outputs=outputs, headers=target.headers)


def latencies(target: Target, n: int) -> list[float]:
    """Seconds per request of ``n`` sequential requests from one client."""
    client, call = _caller(target)
    out = []
    with client:
        for _ in range(n):
            start = time.perf_counter()
            call()
            out.append(time.perf_counter() - start)
    return out


def throughput(target: Target, clients: int, seconds: float) -> float:
    """Requests per second completed by ``clients`` threads, one client each, for ``seconds``."""
    counts = [0] * clients
    stop = threading.Event()
    ready = threading.Barrier(clients + 1)

    def run(i: int) -> None:
        client, call = _caller(target)
        with client:
            call()
            ready.wait()
            while not stop.is_set():
                call()
                counts[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def _without_tracing(argv: list[str]) -> list[str]:
    """Triton's argv minus its ``--trace-config <value>`` pairs."""
    flags = {i for i, arg in enumerate(argv) if arg == "--trace-config"}
    return [arg for i, arg in enumerate(argv) if i not in flags and i - 1 not in flags]


def _write_sample(repository: Path) -> None:
    _write(repository, TRITON_NAME, ExportBundle.load(SAMPLE))


def _write(repository: Path, name: str, bundle: ExportBundle) -> None:
    live = LiveRepository(repository)
    live.write_version(name, 1, bundle)
    live.write_config(name, [1], DeploymentShape(), bundle)


def _minilm_export(target: Path) -> ExportBundle:
    """MiniLM-L6 (shipped in a package, no download) with an untrained 3-class head, exported like a fine-tune:
    a realistic encoder, where Triton's own compute (not a proxy's) dominates a request."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from services.training.core.catalog import shipped_models
    from services.training.runner.export import LogitsOnly

    source = shipped_models()["minilm-l6"]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=3).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    example = tokenizer(["a warm-up sentence"], return_tensors="pt")
    with torch.no_grad():
        traced = torch.jit.freeze(
            torch.jit.trace(LogitsOnly(model).eval(), (example["input_ids"], example["attention_mask"]))
        )
    target.mkdir(parents=True)
    torch.jit.save(traced, str(target / "model.pt"))
    tokenizer.save_pretrained(target / "tokenizer")
    config = json.loads((SAMPLE / "model_config.json").read_text())
    config.update(max_sequence_length=128)
    config["tokenizer"].update(
        files=sorted(p.name for p in (target / "tokenizer").iterdir()), pad_token_id=tokenizer.pad_token_id
    )
    (target / "model_config.json").write_text(json.dumps(config))
    (target / "labels.json").write_text(json.dumps(config["labels"]))
    return ExportBundle.load(target)


async def _tenant_token(auth_address: str, data: Path, env: dict[str, str]) -> str:
    """Creates tenant "bench" with a developer and returns the developer's access token."""
    settings = load_settings(MeshSettings, env)
    password = first_admin_login(auth_address, data)
    anonymous = AuthClient(create_channel(auth_address, settings))
    admin_token = (await anonymous.login("platform", "admin", password)).access_token
    admin = AuthClient(create_channel(auth_address, settings, extra_interceptors=[BearerToken(admin_token)]))  # type: ignore[list-item]
    await admin.create_tenant("bench")
    await admin.create_user("bench", "dev", "correct horse battery", ["developer"])
    token = (await anonymous.login("bench", "dev", "correct horse battery")).access_token
    await admin.close()
    await anonymous.close()
    return token


def _start_gateway(env: dict[str, str], log: Path, *flags: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.bench.serving_gateway", *flags], env=env, cwd=ROOT, stdout=out, stderr=out
        )


def _wait_answering(target: Target, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Blocks until an inference through ``target`` succeeds (the bare proxy has no health service)."""
    deadline = time.monotonic() + timeout
    client, call = _caller(target)
    with client:
        while True:
            try:
                call()
                return
            except triton_grpc.InferenceServerException:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def start_auth(
    work: Path, triton: TritonProcess, routes: str, processes: list[subprocess.Popen[bytes]], **extra: str
) -> tuple[dict[str, str], str]:
    """Starts auth (appended to ``processes``) with a bench tenant; returns the environment of the bench's processes
    (dev mode: plaintext loopback, no billing process; no rate limit; gateway routes ``routes``; ``extra``) and the
    tenant developer's token."""
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
        # One token for the whole bench: many rounds on a loaded machine outlast the default 15 minutes.
        AIDC_AUTH_ACCESS_TOKEN_TTL_SECONDS="86400",
        BENCH_ROUTES=routes,
        **extra,
    )
    processes.append(start_service_process("auth", env, work / "auth.log"))
    wait_serving(auth_address, process=processes[-1])
    return env, asyncio.run(_tenant_token(auth_address, data, env))


def run(rounds: int, access: str = "tls") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _write_sample(work / "models")
        _write(work / "models", MINILM_NAME, _minilm_export(work / "minilm"))
        key = secrets.token_hex(16) if access == "header" else ""
        triton = TritonProcess(work / "models", work / "triton", access_key=key)
        triton.argv = _without_tracing(triton.argv)
        triton.start()
        processes: list[subprocess.Popen[bytes]] = []
        try:
            with triton.client() as control:
                control.load_model(TRITON_NAME, headers=triton.headers)
                control.load_model(MINILM_NAME, headers=triton.headers)
            gateway_address = f"127.0.0.1:{free_port()}"
            env, token = start_auth(
                work,
                triton,
                f"bench/sample={TRITON_NAME}:1,bench/minilm={MINILM_NAME}:1",
                processes,
                AIDC_SERVING_ADDR=gateway_address,
            )
            processes.append(_start_gateway(env, work / "gateway.log"))
            wait_serving(gateway_address, process=processes[-1])
            floor_address = f"127.0.0.1:{free_port()}"
            processes.append(_start_gateway({**env, "AIDC_SERVING_ADDR": floor_address}, work / "floor.log", "--bare"))
            bearer = {"authorization": f"Bearer {token}"}
            for title, model, triton_name in (
                (
                    "the tiny sample classifier (about 1.5 ms in Triton: the worst case for any proxy)",
                    "sample",
                    TRITON_NAME,
                ),
                (
                    "MiniLM-L6 with a 3-class head (a realistic encoder: Triton's compute dominates)",
                    "minilm",
                    MINILM_NAME,
                ),
            ):
                targets = [
                    Target("Triton", triton.grpc_addr, triton_name, triton.headers, triton.access.credentials()),
                    Target("floor", floor_address, triton_name, {}),
                    Target("gateway", gateway_address, model, bearer),
                ]
                _wait_answering(targets[1], processes[-1])
                print(f"\n{title}")
                _report(_measure(targets, rounds), rounds)
        finally:
            for process in processes:
                stop_process(process)
            triton.stop()


def _measure(targets: list[Target], rounds: int) -> dict[str, dict[str, list[float]]]:
    """p50 ms at concurrency 1 and requests/s at concurrency 8 per target, one value per round."""
    for target in targets:  # warm up: connections, caches, the model's first executions
        latencies(target, 50)
        throughput(target, 8, 0.5)
    results: dict[str, dict[str, list[float]]] = {"p50": {}, "rps": {}}
    for i in range(rounds):
        order = targets if i % 2 == 0 else targets[::-1]
        for target in order:
            p50 = statistics.median(latencies(target, C1_REQUESTS)) * 1e3
            results["p50"].setdefault(target.label, []).append(p50)
        for target in order:
            results["rps"].setdefault(target.label, []).append(throughput(target, 8, C8_SECONDS))
    return results


def _summary(values: list[float], unit: str) -> str:
    return f"median {statistics.median(values):.2f}{unit}, rounds {min(values):.2f}..{max(values):.2f}"


def _report(results: dict[str, dict[str, list[float]]], rounds: int) -> None:
    print(f"inference gateway vs Triton, same model and client, {rounds} interleaved rounds")
    for kind, unit in (("p50", "ms"), ("rps", "req/s")):
        for label, values in results[kind].items():
            print(f"  {kind} {label:<8} {' '.join(f'{v:8.2f}' for v in values)}  {unit}")
    p50, rps = results["p50"], results["rps"]
    for label, latency_goal, throughput_goal in (("gateway", " (goal <= 1 ms)", " (goal >= 0.85)"), ("floor", "", "")):
        added = [t - d for t, d in zip(p50[label], p50["Triton"], strict=True)]
        ratio = [t / d for t, d in zip(rps[label], rps["Triton"], strict=True)]
        print(f"  {label}: added p50 at concurrency 1{latency_goal}: {_summary(added, ' ms')}")
        print(f"  {label}: throughput ratio at concurrency 8{throughput_goal}: {_summary(ratio, '')}")


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 5, sys.argv[2] if len(sys.argv) > 2 else "tls")
