"""`make demo`: a walk through what runs today, against the platform `aidc up` started.

It connects as tenants do (the tenant path: TLS with the CA file, tokens), logs in as the platform admin (the stored
CLI login, or the first-start secret), creates a tenant and a developer, exchanges an API key, uploads a dataset,
fine-tunes a model as a job of the scheduler (its path from the queue to the end), deploys it to Triton and
classifies text through the gateway, shows what the developer may and may not do and what billing metered, checks
every component's health, and prints the traces of requests as they crossed the mesh (the fine-tune's runner and
Triton included).
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import secrets
import sys
import time
from collections.abc import Callable
from decimal import Decimal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from rich.console import Console

from services.auth.client import AuthClient, take_bootstrap_admin
from services.billing.client import BillingClient
from services.cli.credentials import (
    Credentials,
    CredentialsStore,
    credentials_path,
    replace_one_time_password,
)
from services.cli.session import BearerToken, bearer_channel, cli_route, cli_settings
from services.gen.aidc.common.v1 import common_pb2
from services.gen.aidc.storage.v1 import storage_service_pb2 as storage_pb
from services.gen.aidc.training.v1 import training_service_pb2 as training_pb
from services.mesh.config import SERVICE_NAMES, MeshSettings
from services.mesh.errors import AidcError, AlreadyExists, PermissionDenied
from services.mesh.spanstore import SpanRecord, SpanStore, render_tree
from services.mesh.telemetry import init_telemetry, shutdown_telemetry
from services.scheduler.client import SchedulerClient, state_name
from services.serving.client import ServingClient, TextClassifierClient
from services.storage.client import StorageClient
from services.training.client import TrainingClient

__all__ = ["main"]

console = Console(soft_wrap=True)

_TWEETS = [
    ("what a wonderful launch, loving it", "positive"),
    ("the service was down again, terrible", "negative"),
    ("the meeting is at noon", "neutral"),
]


def _step(text: str) -> None:
    console.print(f"\n[bold cyan]==>[/] [bold]{text}[/]")


def at(settings: MeshSettings, service: str) -> str:
    """Where the demo, a tenant's client like the CLI, calls ``service``: its tenant address."""
    return cli_route().address(settings, service)


def _token_client(settings: MeshSettings, token: str) -> AuthClient:
    return AuthClient(bearer_channel(at(settings, "auth"), settings, "auth", BearerToken(token)))


async def _admin_token(settings: MeshSettings, anon: AuthClient) -> str:
    store = CredentialsStore(credentials_path(settings.data_dir, os.environ))
    bootstrap = take_bootstrap_admin(settings.data_dir)
    if bootstrap is not None:
        # The one-time password works for one login, which must set a new password: the demo sets one.
        tokens, password = await replace_one_time_password(
            anon.login, bootstrap.tenant, bootstrap.user, bootstrap.password
        )
        console.print(
            f"first start: platform admin [bold]{bootstrap.tenant}/{bootstrap.user}[/]; its one-time password "
            f"was replaced at first use by [bold yellow]{password}[/] (shown once; the CLI is logged in with it)"
        )
        store.save(Credentials.from_token_pair(at(settings, "auth"), tokens, "user:platform/admin", "platform"))
    return await store.access_token(at(settings, "auth"), anon.refresh_token)


async def _health(settings: MeshSettings) -> None:
    for name in SERVICE_NAMES:
        channel = bearer_channel(at(settings, name), settings, name, BearerToken())
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as error:
            status = f"DOWN ({error.code().name})"
        finally:
            await channel.close(None)
        colour = "green" if status == "SERVING" else "red"
        console.print(f"  {name:<10} {at(settings, name):<18} [{colour}]{status}[/]")


def _print_trace(
    store: SpanStore,
    trace_id: str,
    services: set[str],
    at_least: int,
    keep: Callable[[SpanRecord], bool] = lambda _: True,
) -> None:
    spans = []
    for _ in range(50):  # services export their spans in 200 ms batches, Triton every 500 ms
        spans = store.spans(trace_id)
        if services <= {s.service for s in spans} and len(spans) >= at_least:
            break
        time.sleep(0.2)
    console.print(render_tree([s for s in spans if keep(s)]), markup=False, highlight=False)


async def run() -> None:
    settings = cli_settings()
    init_telemetry("aidc-cli", settings.data_dir)
    tracer = trace.get_tracer(__name__)
    anon = AuthClient(bearer_channel(at(settings, "auth"), settings, "auth", BearerToken()))

    _step("Every service of the mesh reports its health")
    await _health(settings)

    _step("Log in as the platform admin")
    admin_token = await _admin_token(settings, anon)
    admin = _token_client(settings, admin_token)
    me = await admin.whoami()
    console.print(f"  logged in as {me.subject} with roles {[b.role for b in me.role_bindings]}")

    _step("Create tenant 'acme' and a developer in it")
    try:
        await admin.create_tenant("acme", "Acme Corp")
        console.print("  created tenant acme")
    except AlreadyExists:
        console.print("  tenant acme exists already")
    name = f"dev-{secrets.token_hex(2)}"
    password = secrets.token_urlsafe(12)
    await admin.create_user("acme", name, password, ["developer"])
    console.print(f"  created user:acme/{name} (developer)")

    _step("The developer logs in, makes an API key and exchanges it for a token")
    with tracer.start_as_current_span("demo: developer signs in") as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
        tokens = await anon.login("acme", name, password)
        dev = _token_client(settings, tokens.access_token)
        key = await dev.create_api_key("acme", description="demo key", ttl_seconds=3600)
        machine = _token_client(settings, (await anon.exchange_api_key(key.secret)).access_token)
        who = await machine.whoami()
    console.print(f"  API key {key.api_key.key_id} authenticates as {who.subject}")

    _step("The developer uploads a text dataset: validated, personal data masked, encrypted with acme's key")
    storage = StorageClient(
        bearer_channel(at(settings, "storage"), settings, "storage", BearerToken(tokens.access_token))
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(_TWEETS * 50)
    writer.writerow(["call me at +1 415 555 0100 or mail jane.doe@example.com", "neutral"])
    writer.writerow(["退款请打到卡号6222021234567890128，有问题打13800138000找我", "negative"])
    data = buffer.getvalue().encode()
    dataset = f"tweets-{secrets.token_hex(2)}"
    await storage.create_dataset("acme", dataset, "demo tweets")
    info = await storage.upload(
        "acme",
        dataset,
        data,
        text_dataset=storage_pb.TextDatasetSpec(format=storage_pb.DATA_FORMAT_CSV),
        masking=storage_pb.MaskingOptions(enabled=True),
    )
    labels = {c.label: c.count for c in info.text_dataset.labels}
    console.print(
        f"  {dataset} v{info.version}: {info.size_bytes} bytes, {info.text_dataset.row_count} rows, labels {labels}, "
        f"{info.masking.masked_total} personal-data spans masked, sha256 {info.sha256[:16]}…"
    )
    back = await storage.download_bytes("acme", dataset)
    for row in back.splitlines()[-2:]:
        console.print(f"  downloaded, masked: {row.decode()!r}")
    await storage.close()

    _step(
        "The developer fine-tunes MiniLM on it: a job of the scheduler (quota, budget, placement), a runner process, "
        "checkpoints, TorchScript export, parity check"
    )
    training = TrainingClient(
        bearer_channel(at(settings, "training"), settings, "training", BearerToken(tokens.access_token))
    )
    scheduler = SchedulerClient(
        bearer_channel(at(settings, "scheduler"), settings, "scheduler", BearerToken(tokens.access_token))
    )
    # Two cores, or the whole default pool when it has fewer (`aidc up --ray` gives half a small machine to Ray).
    pools = await scheduler.list_pools("acme")
    millicores = min([2000, *(p.capacity.cpu_millicores for p in pools if p.default and p.capacity.cpu_millicores)])
    spec = training_pb.FineTuneSpec(
        base_model="minilm-l6",
        dataset=training_pb.DatasetRef(name=dataset),
        sequence_classification=training_pb.SequenceClassificationTask(text_column="text", label_column="label"),
        hyperparameters=training_pb.Hyperparameters(max_steps=20, batch_size=8, max_seq_length=64),
        output_model="sentiment",
        compute=training_pb.ComputeRequest(cpu_millicores=millicores, memory_bytes=2 * 2**30),
    )
    job = await training.submit_fine_tune(spec, tenant="acme")
    console.print(
        f"  job {job.job_id} submitted as scheduler job {job.scheduler_job_id} for {millicores / 1000:g} cores and "
        "2 GiB (20 steps take about a minute)"
    )
    async for job_event in training.watch_job(job.job_id, tenant="acme"):
        which = job_event.WhichOneof("event")
        if which == "state_change":
            state = training_pb.JobState.Name(job_event.state_change.to_state).removeprefix("JOB_STATE_").lower()
            console.print(f"  {state} {job_event.state_change.message}")
        elif which == "scheduling":
            update = job_event.scheduling
            where = f" on {', '.join(update.nodes)}" if update.nodes else ""
            console.print(f"    scheduler: {state_name(update.state)}{where} ({update.reason})")
        elif which == "metrics":
            values = ", ".join(f"{k} {v:.3f}" for k, v in sorted(job_event.metrics.values.items()))
            console.print(f"  epoch {job_event.metrics.epoch} step {job_event.metrics.step}: {values}")
    run = await scheduler.get_job(job.scheduler_job_id)
    await scheduler.close()
    console.print(
        f"  aidc jobs show {run.job_id}: {state_name(run.state)} on {', '.join(run.placement.nodes)} "
        f"({run.placement.executor_ref}), attempt {run.attempt}, by {run.submitted_by} in {run.tenant}, "
        f"ran {run.run_time.ToTimedelta().total_seconds():.1f} s, budget estimate "
        f"{run.estimated_cost.micros / 1e6:.2f} {run.estimated_cost.currency}"
    )
    fine_tune_trace = job.trace_id
    version = await training.get_model_version("sentiment", tenant="acme")
    console.print(
        f"  registered sentiment v{version.version}: lineage {version.lineage.dataset.name} "
        f"v{version.lineage.dataset.version} (sha256 {version.lineage.dataset_sha256[:12]}…), "
        f"parity max |Δlogit| {version.export_parity.max_abs_logit_diff:.1e}"
    )
    await training.close()

    _step("Deploy it to Triton: written into the live repository, loaded, probed with a real inference, routed")
    channel = bearer_channel(at(settings, "serving"), settings, "serving", BearerToken(tokens.access_token))
    began = time.monotonic()
    deployment = await ServingClient(channel).deploy("sentiment", wait=True)
    console.print(
        f"  sentiment v{deployment.version} serving as Triton model {deployment.triton_model_name} "
        f"({time.monotonic() - began:.1f}s)"
    )

    _step("Classify raw text through the inference gateway (KServe v2; tokenization runs inside Triton)")
    with tracer.start_as_current_span("demo: classify tweets") as span:
        infer_trace_id = format(span.get_span_context().trace_id, "032x")
        results = await TextClassifierClient(channel).classify("sentiment", [text for text, _ in _TWEETS])
    for result in results:
        console.print(f"  {result.label:<9} {result.probabilities[result.label]:.2f}  {result.text!r}")
    await channel.close(None)

    _step("What the developer may not do")
    for label, attempt in (
        ("create a tenant", dev.create_tenant("evil-corp")),
        ("create a user in platform", dev.create_user("platform", "mallory", "password-123456")),
    ):
        try:
            await attempt
            console.print(f"  [red]unexpectedly allowed to {label}[/]")
        except PermissionDenied as error:
            console.print(f"  {label}: [green]PERMISSION_DENIED[/] ({error.message})")

    _step("Revoke the API key: it stops working at once")
    await dev.revoke_api_key("acme", key.api_key.key_id)
    try:
        await anon.exchange_api_key(key.secret)
    except AidcError as error:
        console.print(f"  exchanging it now: [green]{error.code.name}[/] ({error.message})")

    _step("The audit log of tenant acme (newest first)")
    for event in (await admin.list_audit_events("acme", page_size=6))[:6]:
        console.print(f"  {event.time.ToDatetime():%H:%M:%S}  {event.actor:<28} {event.action:<16} {event.target}")

    _step("Billing: what acme used (metered exactly once) and an enforced budget")
    billing = BillingClient(bearer_channel(at(settings, "billing"), settings, "billing", BearerToken(admin_token)))
    for _ in range(20):  # the scheduler meters the run's allocation up to its release; its outbox delivers at once
        usage = await billing.query_usage("cpu_core_seconds", tenant="acme")
        if usage.buckets:
            break
        await asyncio.sleep(0.5)
    for _ in range(20):  # the gateway meters in one-second windows
        if (await billing.query_usage("inference_requests", tenant="acme")).buckets:
            break
        await asyncio.sleep(0.5)
    meters = (
        "cpu_core_seconds",
        "memory_gib_seconds",
        "storage_gib_hours",
        "inference_requests",
        "inference_compute_ms",
    )
    for meter in meters:
        buckets = (await billing.query_usage(meter, tenant="acme")).buckets
        total = sum((Decimal(b.value) for b in buckets), Decimal(0))
        console.print(f"  {meter:<20} {total:>16f}  ({sum(b.event_count for b in buckets)} events)")
    usd = common_pb2.Money(micros=100_000_000, currency="USD")
    await billing.set_budget("acme", usd, enforce=True)
    within = await billing.check_budget("acme", common_pb2.Money(micros=5_000_000, currency="USD"), as_caller=True)
    beyond = await billing.check_budget("acme", common_pb2.Money(micros=500_000_000, currency="USD"), as_caller=True)
    console.print(
        f"  budget 100.00 USD/month enforced: a 5 USD job {'allowed' if within.allowed else 'refused'}, "
        f"a 500 USD job {'allowed' if beyond.allowed else 'refused'} ({beyond.reason})"
    )
    await billing.close()

    shutdown_telemetry()
    store = SpanStore(settings.data_dir / "traces")
    _step(f"The trace of the sign-in (aidc trace {trace_id})")
    _print_trace(store, trace_id, {"aidc-cli", "auth"}, 7)
    _step(
        f"The trace of the fine-tune: submission, the scheduler, the runner's phases (aidc trace {fine_tune_trace}; "
        "auth and storage calls left out here)"
    )
    _print_trace(
        store,
        fine_tune_trace,
        {"aidc-cli", "training", "scheduler", "training-runner"},
        12,
        keep=lambda span: "AuthService/" not in span.name and "StorageService/" not in span.name,
    )
    _step(f"The trace of the classification: gateway, auth, Triton, billing (aidc trace {infer_trace_id})")
    _print_trace(store, infer_trace_id, {"aidc-cli", "serving", "auth", "triton", "billing"}, 8)
    for client in (anon, admin, dev, machine):
        await client.close()
    console.print("\n[bold green]demo complete[/] — stop the platform with [bold]make down[/]")


def main() -> int:
    try:
        asyncio.run(run())
    except AidcError as error:
        console.print(f"[red]error: {error.code.name}: {error.message}[/]")
        if "credentials" in error.message or error.code.name == "UNAUTHENTICATED":
            console.print("log in as a platform admin first: aidc login --tenant platform --user admin")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
