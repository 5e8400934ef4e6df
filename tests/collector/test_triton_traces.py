"""Real Triton exporting OTLP/HTTP JSON to the real collector: its spans join the caller's trace."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from opentelemetry import propagate

from services.mesh.spanstore import SpanRecord, SpanStore, render_tree
from services.mesh.telemetry import init_telemetry, shutdown_telemetry, tracer
from tests.collector.harness import REPO_ROOT, free_port, running_collector

TRITON_HOME = Path(os.environ.get("AIDC_TRITON_HOME", REPO_ROOT / ".runtime" / "pytriton" / "tritonserver"))
TRITONSERVER = TRITON_HOME / "bin" / "tritonserver"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not TRITONSERVER.exists(), reason=f"Triton runtime not installed at {TRITON_HOME}"),
]

_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "IN", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "OUT", data_type: TYPE_FP32, dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", data)]))
        return responses
"""


@pytest.fixture
def triton(tmp_path: Path, collector_url: str) -> Iterator[int]:
    """Triton with one python-backend model, tracing every request to the collector; yields its gRPC port."""
    model_dir = tmp_path / "models" / "echo"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(_CONFIG)
    (model_dir / "1" / "model.py").write_text(_MODEL)
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    log = (tmp_path / "triton.log").open("wb")
    process = subprocess.Popen(
        [
            str(TRITONSERVER),
            f"--model-repository={tmp_path / 'models'}",
            f"--backend-directory={TRITON_HOME / 'backends'}",
            "--model-control-mode=explicit",
            "--load-model=echo",
            "--disable-auto-complete-config",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={grpc_port}",
            "--http-address=127.0.0.1",
            f"--http-port={http_port}",
            "--allow-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
            "--allow-gpu-metrics=false",
            "--trace-config=mode=opentelemetry",
            "--trace-config=level=TIMESTAMPS",  # without it Triton traces nothing
            "--trace-config=rate=1",
            f"--trace-config=opentelemetry,url={collector_url}",
            "--trace-config=opentelemetry,resource=service.name=triton",
            "--trace-config=opentelemetry,bsp_schedule_delay=200",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/echo/ready", timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Triton did not start:\n{(tmp_path / 'triton.log').read_text()}") from None
                time.sleep(0.2)
        yield grpc_port
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def collector_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def collector_url(collector_dir: Path) -> Iterator[str]:
    with running_collector(collector_dir) as collector:
        yield collector.traces_url


def _wait(store: SpanStore, trace_id: str, count: int) -> list[SpanRecord]:
    deadline = time.monotonic() + 20
    while len(spans := store.spans(trace_id)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return spans


def test_triton_spans_join_the_callers_trace(collector_dir: Path, triton: int) -> None:
    import tritonclient.grpc as triton_grpc

    # Triton 2.51 now and then ignores an incoming traceparent and starts a trace of its own (seen in about 1 of 5
    # runs, on a request otherwise served fine; tests/e2e and tests/serving retry the same way): a fresh traced
    # request is sent, up to three in all, and every assertion below holds for the one whose trace Triton joined.
    store = SpanStore(collector_dir / "traces")
    provider = init_telemetry("serving", collector_dir, env={})  # the caller writes to the same data dir
    missed: dict[str, list[str]] = {}
    try:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{triton}")
        tensor = triton_grpc.InferInput("IN", [4], "FP32")
        tensor.set_data_from_numpy(np.arange(4, dtype=np.float32))
        for _ in range(3):
            with tracer(__name__).start_as_current_span("ModelInfer") as caller:
                headers: dict[str, str] = {}
                propagate.inject(headers)
                result = client.infer("echo", [tensor], headers=headers)
            assert result.as_numpy("OUT").tolist() == [0.0, 1.0, 2.0, 3.0]
            provider.force_flush()
            trace_id = format(caller.get_span_context().trace_id, "032x")
            spans = _wait(store, trace_id, 4)
            if any(span.service == "triton" for span in spans):
                break
            missed[trace_id] = [span.name for span in spans]
        else:
            raise AssertionError(f"Triton joined none of three traces: {missed}")
    finally:
        shutdown_telemetry()

    caller_id = format(caller.get_span_context().span_id, "016x")
    by_name = {span.name: span for span in spans}
    assert {"ModelInfer", "InferRequest", "echo", "compute"} <= set(by_name), render_tree(spans)
    assert by_name["InferRequest"].parent_span_id == caller_id
    assert by_name["InferRequest"].service == "triton"
    assert by_name["echo"].parent_span_id == by_name["InferRequest"].span_id
    assert by_name["compute"].parent_span_id == by_name["echo"].span_id
    assert by_name["echo"].attributes["triton.model_name"] == "echo"
    # One tree: the caller's span at the top, Triton's three levels under it.
    assert render_tree(spans).splitlines()[0].startswith("ModelInfer  [")
    assert [line.index(line.strip()) for line in render_tree(spans).splitlines()] == [0, 2, 4, 6]
