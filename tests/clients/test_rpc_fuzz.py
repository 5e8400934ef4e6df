"""Fuzzing every RPC of every service (and the KServe v2 methods the gateway serves) on the tenant endpoints of the
real mutual-TLS platform, after the Node.js client's walk left data in it: requests built by hypothesis from each
method's descriptor (tests/clients/fuzzing.py), sent as bytes with the token of acme's developer and of the platform
admin. For every request: the answer is never INTERNAL or UNKNOWN, the call ends by its deadline, and a refused
request leaves its service's state as it was (its read RPCs answer the same before and after). After each method:
every service still answers health SERVING and no component was restarted.

How many examples each method gets per caller: AIDC_FUZZ_EXAMPLES (default 4, for `make test`; e.g. 200 for a long
run). The requests sent per method, and the codes they were answered with, are written to <data dir>/fuzz-counts.json
and printed at the end.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
import tritonclient.grpc.service_pb2  # noqa: F401 - registers inference.GRPCInferenceService in the descriptor pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.serving.gateway import GATEWAY_PERMISSIONS
from tests.clients.conftest import MODEL, PASSWORD, RunningPlatform
from tests.clients.fuzzing import Hints, method_descriptor, request_bytes, state_digest, state_reads
from tests.mesh.standins import all_rules

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("AIDC_FUZZ_EXAMPLES", "4"))
METHODS = sorted([m for m, _ in all_rules().items()] + [m for m, _ in GATEWAY_PERMISSIONS.items()])
CALLERS = ("developer", "platform-admin")
#: Seconds a call may take: unary RPCs answer well within it; streams are read until it passes.
UNARY_TIMEOUT, STREAM_TIMEOUT = 20.0, 3.0
#: What may legitimately outlast the deadline: waiting for a rollout, and streams that follow changes until cancelled.
MAY_WAIT = {"/aidc.serving.v1.ServingService/Deploy"}
BROKEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
HINTS = {
    # The developer aims at its own tenant's data and at another tenant's; the admin never at acme, whose developer's
    # token the fuzzing goes on using.
    "developer": Hints(tenants=("acme", "globex", "platform"), names=(MODEL, "keywords", "tiny-bert", "default")),
    "platform-admin": Hints(tenants=("globex", "platform", "fuzz"), names=(MODEL, "keywords", "tiny-bert", "fuzz")),
}
COUNTS: Counter[str] = Counter()
#: The status codes each method answered, with how often.
CODES: dict[str, Counter[str]] = {}


def _service_of(method: str) -> str:
    package = method.lstrip("/").split(".")[:2]
    return "serving" if package[0] == "inference" else package[1]


class Session:
    """Channels to each service's tenant endpoint (the CA file, no client certificate) and the callers' tokens."""

    def __init__(self, running: RunningPlatform) -> None:
        self.running = running
        assert running.ca_file is not None
        self._credentials = grpc.ssl_channel_credentials(running.ca_file.read_bytes())
        self._channels: dict[str, grpc.Channel] = {}
        self.tokens = {
            "developer": self._login("acme", "dev", PASSWORD),
            "platform-admin": self._login("platform", "admin", running.admin_password),
        }
        self.reads = state_reads(("acme", "globex"))

    def channel(self, service: str) -> grpc.Channel:
        if service not in self._channels:
            address = self.running.tenant_address(service)
            self._channels[service] = grpc.secure_channel(address, self._credentials)
        return self._channels[service]

    def _login(self, tenant: str, name: str, password: str) -> str:
        from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
        from services.gen.aidc.auth.v1 import auth_service_pb2_grpc

        stub = auth_service_pb2_grpc.AuthServiceStub(self.channel("auth"))
        return str(
            stub.Login(pb.LoginRequest(tenant=tenant, name=name, password=password), timeout=30).tokens.access_token
        )

    def digest(self, service: str) -> str:
        return state_digest(self.channel, self.reads[service], service, self.tokens["platform-admin"])

    def components(self) -> dict[str, tuple[int | None, int]]:
        return {c.name: (c.pid, c.restarts) for c in self.running.platform.state().components}

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


@pytest.fixture(scope="module")
def session(mtls_walk: RunningPlatform) -> Iterator[Session]:
    running = Session(mtls_walk)
    for service in running.reads:
        assert running.digest(service) == running.digest(service), f"{service}'s state changes on its own"
    yield running
    running.close()
    counts = {method: COUNTS[method] for method in METHODS}
    answers = {method: dict(CODES.get(method, {})) for method in METHODS}
    report = {"examples_per_caller": EXAMPLES, "requests": counts, "codes": answers}
    (mtls_walk.platform.data_dir / "fuzz-counts.json").write_text(json.dumps(report, indent=2))
    print(f"\nfuzz requests per method ({EXAMPLES} examples per caller; {sum(counts.values())} in all):")
    for method, count in counts.items():
        codes = ", ".join(f"{name} {n}" for name, n in sorted(answers[method].items()))
        print(f"  {count:6d}  {method}  ({codes})")


def _send(session: Session, method: str, messages: list[bytes], token: str) -> tuple[grpc.StatusCode, float]:
    """Sends one call of ``method`` (every message of a client stream); its status and how long it took."""
    descriptor = method_descriptor(method)
    channel = session.channel(_service_of(method))
    metadata = (("authorization", f"Bearer {token}"),)
    timeout = STREAM_TIMEOUT if descriptor.server_streaming else UNARY_TIMEOUT
    began = time.monotonic()
    try:
        if descriptor.client_streaming and descriptor.server_streaming:
            for _ in channel.stream_stream(method)(iter(messages), metadata=metadata, timeout=timeout):
                pass
        elif descriptor.client_streaming:
            channel.stream_unary(method)(iter(messages), metadata=metadata, timeout=timeout)
        elif descriptor.server_streaming:
            for _ in channel.unary_stream(method)(messages[0], metadata=metadata, timeout=timeout):
                pass
        else:
            channel.unary_unary(method)(messages[0], metadata=metadata, timeout=timeout)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()  # type: ignore[attr-defined]
    return code, time.monotonic() - began


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("method", METHODS)
def test_fuzz_rpc(session: Session, method: str, caller: str) -> None:
    descriptor = method_descriptor(method)
    service = _service_of(method)
    hints = HINTS[caller]
    one = request_bytes(descriptor.input_type, hints)
    calls = (
        st.lists(one, min_size=1, max_size=3) if descriptor.client_streaming else st.lists(one, min_size=1, max_size=1)
    )
    components = session.components()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(made=calls)
    def fuzz(made: list[tuple[str, bytes]]) -> None:
        before = session.digest(service)
        code, took = _send(session, method, [data for _, data in made], session.tokens[caller])
        COUNTS[method] += 1
        CODES.setdefault(method, Counter())[code.name] += 1
        how = "+".join(kind for kind, _ in made)
        assert code not in BROKEN, f"{method} as {caller} ({how}) answered {code.name}"
        timeout = STREAM_TIMEOUT if descriptor.server_streaming else UNARY_TIMEOUT
        assert took < timeout + 2.0, f"{method} as {caller} ({how}) took {took:.1f}s"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and not descriptor.server_streaming:
            assert method in MAY_WAIT, f"{method} as {caller} ({how}) hung until its deadline"
        if code != grpc.StatusCode.OK:
            assert session.digest(service) == before, (
                f"{method} as {caller} ({how}) was refused ({code.name}) but changed {service}'s state"
            )

    fuzz()
    for name in session.reads:
        stub = health_pb2_grpc.HealthStub(session.channel(name))
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, f"{name} not SERVING after fuzzing {method}"
    assert session.components() == components, f"a component restarted while {method} was fuzzed"
