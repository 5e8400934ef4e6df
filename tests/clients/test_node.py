"""A second language, proven: the Node.js client in tests/clients/node (@grpc/grpc-js and @grpc/proto-loader loading
protos/ as they are, and Triton's KServe v2 service from tritonclient's descriptors) walks the tenant API of a real
`aidc up` with nothing but the CA file and its tenant's credentials: log in, make an API key and exchange it, upload
a dataset (client streaming) and download it back (server streaming), list datasets, register a base model, fine-tune
and watch it, deploy, classify raw text through the gateway, read the usage; and it is refused without a token, with a
tampered one, on another tenant's dataset and model, and on a mesh-only RPC. The same walk runs in plaintext dev
mode, but for the fine-tune, deployment and inference: there training has no service identity, so a fine-tune is
refused with FAILED_PRECONDITION (README).
"""

from __future__ import annotations

import grpc
import pytest

from tests.clients.conftest import TEXTS, RunningPlatform

pytestmark = pytest.mark.slow

_KEYWORD_LABELS = {"negative", "neutral", "positive"}


@pytest.mark.parametrize("mode", ["mtls", "plaintext"])
def test_node_client_walks_the_tenant_api(mode: str, request: pytest.FixtureRequest) -> None:
    running: RunningPlatform = request.getfixturevalue(f"{mode}_walk")
    seen = running.node
    print(f"node client against the {mode} platform: {running.node_seconds:.1f}s")
    assert running.tls == (running.ca_file is not None)
    assert seen["subject"] == "user:acme/dev"
    assert seen["datasetBytes"] > 1000
    assert "default" in seen["pools"]
    code = {c.value[0]: c for c in grpc.StatusCode}
    refusals = {name: code[number] for name, number in seen["refusals"].items()}
    if running.tls:
        assert seen["jobStates"][-1] == "JOB_STATE_SUCCEEDED" and "JOB_STATE_RUNNING" in seen["jobStates"]
        assert seen["modelVersion"] == 1
        assert len(seen["labels"]) == len(TEXTS) and set(seen["labels"]) <= _KEYWORD_LABELS, seen["labels"]
        assert seen["inferenceRequests"] >= 1
    else:  # no service identities in plaintext dev mode: the scheduler runs nothing for training (README)
        assert refusals.pop("fineTuneWithoutMesh") == grpc.StatusCode.FAILED_PRECONDITION
    elsewhere = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND}  # either reveals nothing
    assert refusals.pop("noToken") == grpc.StatusCode.UNAUTHENTICATED
    assert refusals.pop("tamperedToken") == grpc.StatusCode.UNAUTHENTICATED
    assert refusals.pop("noTokenInference") == grpc.StatusCode.UNAUTHENTICATED
    assert refusals.pop("recordUsage") == grpc.StatusCode.PERMISSION_DENIED
    assert refusals.pop("otherTenantsDataset") in elsewhere
    assert refusals.pop("otherTenantsModel") in elsewhere
    assert refusals.pop("otherTenantsModelVersion") in elsewhere
    assert refusals == {}
