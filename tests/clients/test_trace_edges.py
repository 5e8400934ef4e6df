"""Trace edges: after the Node.js client's walk through the real mutual-TLS platform (log in, upload, fine-tune,
deploy, infer, usage), the span store must hold every expected parent -> child edge between services: one table,
each missing edge named.

An edge is a span of one service whose parent span belongs to another service. "client" is the tenant's program:
the Node.js client sends a W3C traceparent on every call, so a server span of its trace whose parent span is in no
service's store was called by the client.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from services.auth.client import AuthClient
from services.mesh.spanstore import SpanRecord, SpanStore
from tests.clients.conftest import MODEL, PASSWORD, TEXTS, RunningPlatform

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Edge:
    parent: str
    child: str
    why: str


EXPECTED: tuple[Edge, ...] = (
    Edge("client", "auth", "login, API key, WhoAmI"),
    Edge("client", "storage", "dataset upload, list, download"),
    Edge("client", "training", "base model, fine-tune, watch"),
    Edge("client", "scheduler", "pools"),
    Edge("client", "billing", "usage query"),
    Edge("client", "serving", "deploy and KServe v2 inference"),
    Edge("storage", "auth", "permission checks for the caller"),
    Edge("training", "auth", "permission checks, the job's delegation"),
    Edge("scheduler", "auth", "permission checks"),
    Edge("billing", "auth", "permission checks"),
    Edge("serving", "auth", "permission checks (deploy, infer)"),
    Edge("storage", "billing", "storage_gib_hours metered at upload"),
    Edge("serving", "billing", "budget check and inference usage"),
    Edge("training", "storage", "the dataset read, the export written"),
    Edge("serving", "training", "the registry's version of the deployment"),
    Edge("serving", "storage", "the export fetched for Triton"),
    Edge("serving", "triton", "the gateway forwards ModelInfer with its traceparent"),
    Edge("training", "scheduler", "the fine-tune submitted as a scheduler job, followed with WatchJobs"),
    Edge("training", "training-runner", "the job's process (launched by the scheduler) joins the submission's trace"),
)


def service_edges(spans: list[SpanRecord], client_trace: str) -> set[tuple[str, str]]:
    """(parent service, child service) for every span whose parent is another service's span; ("client", service)
    for server spans of ``client_trace`` whose parent is in no store."""
    by_id = {(s.trace_id, s.span_id): s for s in spans}
    edges = set()
    for span in spans:
        parent = by_id.get((span.trace_id, span.parent_span_id)) if span.parent_span_id else None
        if parent is not None and parent.service != span.service:
            edges.add((parent.service, span.service))
        elif parent is None and span.trace_id == client_trace and span.parent_span_id and span.kind == "SERVER":
            edges.add(("client", span.service))
    return edges


def _missing(store: SpanStore, client_trace: str, timeout: float) -> list[Edge]:
    """The expected edges not in the store, once all are or ``timeout`` has passed (spans leave the services in
    batches: 200 ms; Triton 500 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        found = service_edges(list(store.iter_spans()), client_trace)
        missing = [edge for edge in EXPECTED if (edge.parent, edge.child) not in found]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(1)


def _traced_inference(running: RunningPlatform) -> None:
    """One more inference as acme's developer through the gateway, with a traceparent of its own."""

    async def login() -> str:
        auth = AuthClient(running.channel("auth"))
        try:
            return (await auth.login("acme", "dev", PASSWORD)).access_token
        finally:
            await auth.close()

    token = asyncio.run(login())
    assert running.ca_file is not None
    client = triton_grpc.InferenceServerClient(
        running.tenant_address("serving"), ssl=True, root_certificates=str(running.ca_file)
    )
    text = triton_grpc.InferInput("TEXT", [len(TEXTS), 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode()] for t in TEXTS], dtype=np.object_))
    headers = {"authorization": f"Bearer {token}", "traceparent": f"00-{secrets.token_hex(16)}-00f067aa0ba902b7-01"}
    try:
        client.infer(MODEL, [text], headers=headers)
    finally:
        client.close()


def test_every_expected_service_edge_is_traced(mtls_walk: RunningPlatform) -> None:
    store = SpanStore(mtls_walk.platform.data_dir / "traces")
    missing = _missing(store, mtls_walk.node_trace_id, 30)
    # Triton 2.51 now and then ignores an incoming traceparent and starts a trace of its own (the request is served
    # fine): the walk's one inference then leaves no serving -> triton edge. Fresh traced requests, up to three.
    for _ in range(3):
        if [(e.parent, e.child) for e in missing] != [("serving", "triton")]:
            break
        _traced_inference(mtls_walk)
        missing = _missing(store, mtls_walk.node_trace_id, 15)
    assert not missing, "missing trace edges:\n" + "\n".join(f"  {e.parent} -> {e.child} ({e.why})" for e in missing)
