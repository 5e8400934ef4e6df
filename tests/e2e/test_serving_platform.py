"""Serving as a tenant meets it, on the real platform `aidc up` starts (mTLS on, every component its own process):
fine-tune, deploy by alias, infer with the stock `tritonclient.grpc` through the gateway, one trace from the gateway
through auth and Triton to billing, usage metered in billing, the alias moved (the deployment follows), Triton killed
(UNAVAILABLE within the deadline) and restarted by the supervisor (serving again without restarting the mesh), and
every file the run created private to the platform's user."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from services.auth.client import AuthClient
from services.billing.client import BillingClient
from services.cli.session import BearerToken
from services.gen.aidc.serving.v1 import serving_service_pb2 as serving_pb
from services.gen.aidc.training.v1 import training_service_pb2 as training_pb
from services.mesh.channels import create_channel
from services.mesh.config import MeshSettings, load_settings
from services.mesh.metrics import Scrape, scrape
from services.mesh.spanstore import SpanStore
from services.serving.client import ServingClient
from services.storage.client import StorageClient
from services.training.client import TrainingClient
from services.training.runner.tiny import build_tiny_bert, keyword_dataset
from tests.platform.test_supervisor import Platform, platform_env, private_modes  # noqa: F401 - fixture
from tests.training.conftest import keyword_spec, run_job, upload_keywords_and_tiny_bert

pytestmark = pytest.mark.slow

_T = TypeVar("_T")
_TERMINAL = {training_pb.JOB_STATE_SUCCEEDED, training_pb.JOB_STATE_FAILED, training_pb.JOB_STATE_CANCELLED}


class Mesh:
    """Channels to the platform's services over mTLS (the CLI's certificate) carrying one user's token."""

    def __init__(self, settings: MeshSettings) -> None:
        self.settings = settings
        self._channels: list[grpc.aio.Channel] = []

    def channel(self, service: str, token: str = "") -> grpc.aio.Channel:
        interceptors = [cast(grpc.aio.ClientInterceptor, BearerToken(token))] if token else []
        channel = create_channel(self.settings.address_of(service), self.settings, extra_interceptors=interceptors)
        self._channels.append(channel)
        return channel

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)


def _triton_client(p: Platform) -> triton_grpc.InferenceServerClient:
    """A stock tritonclient pointed at the gateway's tenant endpoint (not at Triton): TLS with the CA file only, as a
    tenant holds it."""
    return triton_grpc.InferenceServerClient(
        p.env["AIDC_SERVING_TENANT_ADDR"], ssl=True, root_certificates=str(p.data_dir / "certs" / "ca.pem")
    )


def _text_input(texts: list[str]) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("TEXT", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
    return tensor


async def _eventually(probe: Callable[[], Awaitable[_T | None]], timeout: float, what: str) -> _T:
    deadline = time.monotonic() + timeout
    while True:
        found = await probe()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what} not seen within {timeout:.0f}s"
        await asyncio.sleep(0.5)


def _aidc(p: Platform, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `aidc` command line against the platform."""
    command = [sys.executable, "-c", "from services.cli.main import app; app()", *args]
    env = {**p.env, "COLUMNS": "200"}  # rich would fold the tables to 80 columns
    return subprocess.run(command, env=env, cwd=p.cwd, capture_output=True, text=True, timeout=120)


async def _fine_tune(mesh: Mesh, token: str, seed: int) -> int:
    done = await run_job(TrainingClient(mesh.channel("training", token)), keyword_spec(seed=seed))
    assert done.state == training_pb.JOB_STATE_SUCCEEDED, done.error
    return int(done.model_version)


async def _scenario(p: Platform, admin_password: str, work: Path) -> None:
    settings = load_settings(MeshSettings, p.env)
    mesh = Mesh(settings)
    try:
        anon = AuthClient(mesh.channel("auth"))
        admin_token = (await anon.login("platform", "admin", admin_password)).access_token
        admin = AuthClient(mesh.channel("auth", admin_token))
        for tenant in ("acme", "globex"):
            await admin.create_tenant(tenant)
            await admin.create_user(tenant, "dev", "correct horse battery", ["developer"])
        dev = (await anon.login("acme", "dev", "correct horse battery")).access_token
        other = (await anon.login("globex", "dev", "correct horse battery")).access_token
        before = scrape_all(p)

        # A tiny BERT fine-tuned twice on keyword data: versions 1 and 2; alias production -> 1.
        files = StorageClient(mesh.channel("storage", dev))
        training = TrainingClient(mesh.channel("training", dev))
        tiny = build_tiny_bert(
            work / "tiny-bert", [t for t, _ in keyword_dataset(2000, seed=99)], max_position_embeddings=64
        )
        await upload_keywords_and_tiny_bert(files, training, tiny)
        assert await _fine_tune(mesh, dev, seed=7) == 1
        await training.set_alias("keywords-clf", "production", 1, tenant="acme")

        serving = ServingClient(mesh.channel("serving", dev))
        deployed = await serving.deploy("keywords-clf", alias="production", wait=True)
        assert (deployed.state, deployed.version, deployed.alias) == (
            serving_pb.DEPLOYMENT_STATE_READY,
            1,
            "production",
        )

        # The stock Triton client, unchanged but for the bearer token, against the gateway.
        client = _triton_client(p)
        headers = {"authorization": f"Bearer {dev}"}
        assert client.is_server_live(headers=headers) and client.is_server_ready(headers=headers)
        assert client.is_model_ready("keywords-clf", headers=headers)
        metadata = client.get_model_metadata("keywords-clf", headers=headers)
        assert metadata.name == "keywords-clf" and {i.name for i in metadata.inputs} >= {"TEXT"}
        texts = [text for text, _ in keyword_dataset(6, seed=5)]
        result = client.infer("keywords-clf", [_text_input(texts)], headers=headers)
        served = 1  # requests the gateway served for acme (each must be billed exactly once)
        labels = [label.decode() for label in result.as_numpy("LABEL").reshape(-1)]
        assert len(labels) == 6 and set(labels) <= {"negative", "neutral", "positive"}
        assert (result.get_response().model_name, result.get_response().model_version) == ("keywords-clf", "1")

        # Tenancy at the gateway.
        with pytest.raises(InferenceServerException, match="PERMISSION_DENIED|may not"):
            client.infer("acme/keywords-clf", [_text_input(texts)], headers={"authorization": f"Bearer {other}"})
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED|credentials"):
            client.infer("keywords-clf", [_text_input(texts)])
        with pytest.raises(InferenceServerException, match="NOT_FOUND|not deployed"):
            client.infer("no-such-model", [_text_input(texts)], headers=headers)

        # One trace: the gateway, auth's permission check, Triton's request and compute spans, billing's budget check
        # (decisions are not cached on this platform, so every request asks auth and billing). Triton 2.51 now and
        # then ignores an incoming traceparent and starts a trace of its own (seen in about 1 of 5 runs here, on a
        # request that is otherwise served fine): a fresh traced request is then sent, up to three in all.
        store = SpanStore(p.data_dir / "traces")
        wanted = {"serving", "auth", "triton", "billing"}
        found: dict[str, set[str]] = {}
        for _ in range(3):
            trace_id = secrets.token_hex(16)
            traced = {**headers, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
            client.infer("keywords-clf", [_text_input(texts)], headers=traced)
            served += 1

            async def whole_trace(trace_id: str = trace_id) -> set[str] | None:
                services = {span.service for span in store.spans(trace_id)}
                return services if wanted <= services else None

            try:
                await _eventually(whole_trace, 15, "gateway, auth, Triton and billing spans in one trace")
                break
            except AssertionError:
                found[trace_id] = {f"{span.service}:{span.name}" for span in store.spans(trace_id)}
        else:
            raise AssertionError(f"no trace held {wanted}: {found}")
        names = {span.name for span in store.spans(trace_id) if span.service == "triton"}
        assert any("InferRequest" in name for name in names) and any("compute" in name.lower() for name in names), names

        # Usage: one inference_requests event per served request, in billing: none lost, none counted twice (refused
        # requests, model metadata and the deployer's probes are not billed).
        billing = BillingClient(mesh.channel("billing", admin_token))

        async def metered() -> tuple[Decimal, int] | None:
            buckets = (await billing.query_usage("inference_requests", tenant="acme")).buckets
            total = sum((Decimal(b.value) for b in buckets), Decimal(0))
            return (total, sum(b.event_count for b in buckets)) if total >= served else None

        assert await _eventually(metered, 60, f"{served} inference requests in billing") == (served, served)

        # Metrics: every component's /metrics moved with the flow, and the local Prometheus scrapes them all.
        await check_metrics(p, before)

        # The alias moves to a new version: the deployment follows it without anyone calling Deploy.
        assert await _fine_tune(mesh, dev, seed=8) == 2
        await training.set_alias("keywords-clf", "production", 2, tenant="acme")

        async def moved() -> bool:
            return (await serving.get_deployment("keywords-clf")).version == 2

        await _eventually(moved, 60, "the deployment following its alias to version 2")
        # Inference is answered by version 2 now, not only the deployment record.
        answer = client.infer("keywords-clf", [_text_input(texts)], headers=headers).get_response()
        assert (answer.model_name, answer.model_version) == ("keywords-clf", "2")

        # The CLI, logged in as the platform admin by `aidc up`, sees and uses it too.
        listed = _aidc(p, "deployments", "--tenant", "acme")
        assert listed.returncode == 0 and "keywords-clf" in listed.stdout and "v2" in listed.stdout, listed
        inferred = _aidc(p, "infer", "acme/keywords-clf", texts[0], texts[1])
        assert inferred.returncode == 0, inferred
        assert sum(label in inferred.stdout for label in ("negative", "neutral", "positive")) >= 1, inferred.stdout
        refused = _aidc(p, "deploy", "keywords-clf:7", "--tenant", "acme")
        assert refused.returncode != 0 and "NOT_FOUND" in refused.stdout + refused.stderr, refused

        # Triton killed: UNAVAILABLE well within the deadline; the supervisor restarts it and serving reloads it.
        triton_pid = next(c.pid for c in p.state().components if c.name == "triton")
        assert triton_pid is not None
        import os
        import signal

        os.kill(triton_pid, signal.SIGKILL)
        # UNAVAILABLE, not held until the caller's deadline (60 s) waiting for Triton; the bound is far below it.
        began = time.monotonic()
        with pytest.raises(InferenceServerException, match="UNAVAILABLE|unavailable"):
            client.infer("keywords-clf", [_text_input(texts)], headers=headers, client_timeout=60.0)
        assert time.monotonic() - began < 20.0

        async def serving_again() -> bool:
            try:
                return (
                    client.infer("keywords-clf", [_text_input(texts)], headers=headers, client_timeout=5.0) is not None
                )
            except InferenceServerException:
                return False

        await _eventually(serving_again, 90, "inference after Triton's restart")
        client.close()

        # Everything this run created (databases, keys, logs, job directories, base models, exports, the live
        # model repository Triton read, the object store's files) is the platform user's alone. SeaweedFS sets
        # its volume info files (*.vif) to 0644 itself; they are in its 0700 data directory.
        wrong = private_modes(p.data_dir)
        assert [w for w in wrong if not (w.startswith("0o644 s3/data/") and w.endswith(".vif"))] == [], wrong
    finally:
        await mesh.close()


def scrape_all(p: Platform) -> dict[str, Scrape]:
    """One scrape of every component that serves metrics (the supervisor's included), over mTLS as the operator."""
    state = p.state()
    urls = {c.name: c.metrics_url for c in state.components if c.metrics_url}
    urls["supervisor"] = state.metrics_url
    return {name: scrape(url, p.data_dir / "certs") for name, url in urls.items()}


#: The gRPC service each mesh service serves its product RPCs on (the scheduler is not called in this flow).
_PRODUCT = {
    "auth": "aidc.auth.v1.AuthService",
    "storage": "aidc.storage.v1.StorageService",
    "training": "aidc.training.v1.TrainingService",
    "billing": "aidc.billing.v1.BillingService",
    "serving": "inference.GRPCInferenceService",
    "scheduler": "grpc.health.v1.Health",
}


def _prometheus(p: Platform, path: str) -> dict[str, object]:
    """The local Prometheus's HTTP API (HTTPS, the operator's client certificate)."""
    certs = p.data_dir / "certs"
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    context.load_cert_chain(str(certs / "cli.pem"), str(certs / "cli-key.pem"))
    url = f"https://127.0.0.1:{p.env['AIDC_PROMETHEUS_PORT']}{path}"
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return cast(dict[str, object], json.loads(response.read()))


async def check_metrics(p: Platform, before: dict[str, Scrape]) -> None:
    """After the flow: RPC histograms and each service's own figures moved; Triton's statistics are relayed;
    Prometheus scrapes every component and has the alert rules loaded; `aidc status` shows the figures."""

    async def relayed() -> dict[str, Scrape] | None:
        now = scrape_all(p)
        return now if now["serving"].value("nv_inference_request_success", model="acme__keywords-clf") >= 1 else None

    after = await _eventually(relayed, 30, "Triton's statistics relayed by serving")

    def moved(component: str, name: str, **labels: str) -> float:
        return after[component].value(name, **labels) - before[component].value(name, **labels)

    for service, grpc_service in _PRODUCT.items():
        assert moved(service, "grpc_server_handled_total", grpc_service=grpc_service, grpc_code="OK") > 0, service
        assert moved(service, "grpc_server_handling_seconds_count", grpc_service=grpc_service) > 0, service
        if service not in ("auth", "scheduler"):  # decisions are not cached here: every checked call asks auth
            assert moved(service, "aidc_authz_decisions_total", source="auth") > 0, service
    assert moved("auth", "aidc_auth_decisions_total", result="allowed") > 0
    assert moved("auth", "aidc_auth_decisions_total", result="denied") > 0  # globex's developer was refused
    assert moved("storage", "aidc_storage_transfer_bytes_total", tenant="acme", direction="upload") > 0
    assert after["storage"].value("aidc_storage_stored_bytes", tenant="acme") > 0
    assert after["storage"].value("aidc_storage_objects", tenant="acme") >= 2  # the dataset and the base model
    assert moved("training", "aidc_training_jobs_finished_total", state="succeeded") >= 1
    assert moved("training", "aidc_training_steps_total") > 0
    assert moved("scheduler", "aidc_scheduler_cycle_seconds_count") > 0
    assert moved("billing", "aidc_billing_usage_events_total", status="accepted") > 0
    assert after["billing"].value("aidc_billing_usage_total", tenant="acme", meter="inference_requests") >= 1
    assert after["billing"].value("aidc_billing_budget_exhausted", tenant="acme") == 0
    assert moved("serving", "aidc_gateway_inferences_total", tenant="acme", model="keywords-clf") >= 2
    assert moved("serving", "aidc_gateway_inference_seconds_count", tenant="acme", model="keywords-clf") >= 2
    assert moved("serving", "aidc_usage_events_delivered_total", source="serving", status="accepted") > 0
    assert after["serving"].value("aidc_serving_triton_up") == 1
    assert after["serving"].value("nv_inference_compute_infer_duration_us", model="acme__keywords-clf") > 0
    for component in [c.name for c in p.state().components]:
        assert after["supervisor"].value("aidc_component_up", component=component) == 1, component

    # Prometheus: every target up, the rules loaded and healthy.
    jobs = {*_PRODUCT, "supervisor", "prometheus"}

    async def all_up() -> set[str] | None:
        result = cast(dict[str, Any], _prometheus(p, "/api/v1/query?query=up"))["data"]["result"]
        up = {sample["metric"]["job"] for sample in result if sample["value"][1] == "1"}
        return up if up == jobs else None

    await _eventually(all_up, 60, f"Prometheus scraping {sorted(jobs)}")
    groups = cast(dict[str, Any], _prometheus(p, "/api/v1/rules"))["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 14 and all(rule["health"] == "ok" for rule in rules), rules
    rate = "/api/v1/query?query=" + urllib.parse.quote('sum(aidc_gateway_inferences_total{tenant="acme"})')

    async def inferences_scraped() -> float | None:
        # "up" can come from a scrape before the inferences: Prometheus sees them at its next scrape of serving.
        answer = cast(dict[str, Any], _prometheus(p, rate))["data"]["result"]
        return float(answer[0]["value"][1]) if answer and float(answer[0]["value"][1]) >= 2 else None

    await _eventually(inferences_scraped, 60, "acme's two inferences in Prometheus")

    status = _aidc(p, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "since each component started, from its /metrics" in status.stdout
    assert re.search(r"serving .*inferences \d+", status.stdout), status.stdout


def test_serving_through_the_platform(platform_env: Platform, tmp_path: Path) -> None:  # noqa: F811
    p = platform_env
    p.env.update(
        AIDC_MONITORING="true",
        AIDC_PROMETHEUS_SCRAPE_INTERVAL_SECONDS="1",
        AIDC_SERVING_ALIAS_POLL_SECONDS="1",
        AIDC_SERVING_RECONCILE_INTERVAL_SECONDS="0.5",
        AIDC_SERVING_METERING_INTERVAL_SECONDS="0.5",
        AIDC_RESTART_BACKOFF_SECONDS="0.5",
        # Every inference asks auth and billing, so any traced request shows the whole path.
        AIDC_DECISION_CACHE_SECONDS="0",
        AIDC_SERVING_BUDGET_CACHE_SECONDS="0",
    )
    up = p.cli("up", "--detach")
    assert up.returncode == 0, p.diagnostics(up)
    match = re.search(r"password:\s+(\S+)", up.stdout)
    assert match is not None, up.stdout
    asyncio.run(_scenario(p, match.group(1), tmp_path))
