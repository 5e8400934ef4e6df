"""Trace edges: after the Node.js client's walk through the real mutual-TLS platform (log in, upload, fine-tune,
deploy, infer, usage), the span store must hold every expected parent -> child edge between services: one table,
each missing edge named.

An edge is a span of one service whose parent span belongs to another service. "client" is the tenant's program:
the Node.js client sends a W3C traceparent on every call, so a server span of its trace whose parent span is in no
service's store was called by the client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from services.mesh.spanstore import SpanRecord, SpanStore
from tests.clients.conftest import RunningPlatform

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


def test_every_expected_service_edge_is_traced(mtls_walk: RunningPlatform) -> None:
    store = SpanStore(mtls_walk.platform.data_dir / "traces")
    required = list(EXPECTED)
    missing: list[Edge] = []
    found: set[tuple[str, str]] = set()
    deadline = time.monotonic() + 30  # spans leave the services in batches (200 ms; Triton 500 ms)
    while True:
        found = service_edges(list(store.iter_spans()), mtls_walk.node_trace_id)
        missing = [edge for edge in required if (edge.parent, edge.child) not in found]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, "missing trace edges:\n" + "\n".join(f"  {e.parent} -> {e.child} ({e.why})" for e in missing)
