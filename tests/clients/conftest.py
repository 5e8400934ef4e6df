"""Real platforms for tenants' clients: `aidc up` in a temp data dir on free ports, once with its default mutual TLS and
once in plaintext dev mode, each shared by the tests of this directory (starting one takes about a minute here), and
the Node.js client's walk through the tenant API, run once per platform."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc.service_pb2 as kserve_pb
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

from services.auth.client import AuthClient
from services.cli.session import BearerToken
from services.mesh.channels import tenant_channel
from services.mesh.config import SERVICE_NAMES, MeshSettings, load_settings
from services.training.runner.tiny import keyword_dataset, to_csv
from tests.conftest import ROOT
from tests.platform.test_supervisor import Platform, platform_environment
from tests.training.conftest import tiny_bert_dir, tiny_model_tar  # noqa: F401 - a session fixture

NODE_DIR = ROOT / "tests" / "clients" / "node"
PASSWORD = "correct horse battery"
MODEL = "keywords-clf"
TEXTS = ["the weather is sunny and warm", "my order arrived broken", "the meeting is at noon"]
#: The fine-tune the Node client submits: the tiny BERT on the keyword data, a few seconds here.
HYPERPARAMETERS = {
    "epochs": 2,
    "batch_size": 8,
    "warmup_ratio": 0.1,
    "learning_rate": 3e-3,
    "max_seq_length": 32,
    "eval_fraction": 0.2,
    "seed": 7,
}


@dataclass
class RunningPlatform:
    """A platform `aidc up` started, its admin password, and the tenants acme and globex with a developer each."""

    platform: Platform
    mode: str
    admin_password: str
    settings: MeshSettings
    #: Set once the Node client walked through it: what it printed, how long it took, the trace its calls joined.
    node: dict[str, Any] = field(default_factory=dict)
    node_seconds: float = 0.0
    node_trace_id: str = ""

    @property
    def tls(self) -> bool:
        return self.mode == "mtls"

    @property
    def ca_file(self) -> Path | None:
        tls_dir = self.settings.tls_dir()
        return tls_dir / "ca.pem" if tls_dir is not None else None

    def tenant_address(self, service: str) -> str:
        address = self.settings.tenant_address_of(service)
        assert address is not None
        return address

    def channel(self, service: str, token: str = "") -> Any:
        """A channel on the tenant path, as a tenant holds one (the CA file only), carrying ``token``."""
        return tenant_channel(
            self.tenant_address(service),
            self.settings,
            extra_interceptors=[BearerToken(token)],  # type: ignore[list-item]
        )


async def _create_tenants(running: RunningPlatform) -> None:
    anon = AuthClient(running.channel("auth"))
    admin_token = (await anon.login("platform", "admin", running.admin_password)).access_token
    admin = AuthClient(running.channel("auth", admin_token))
    for tenant in ("acme", "globex"):
        await admin.create_tenant(tenant)
        await admin.create_user(tenant, "dev", PASSWORD, ["developer"])
    await anon.close()
    await admin.close()


def _start(tmp: Path, mode: str) -> Iterator[RunningPlatform]:
    platform = platform_environment(tmp)
    if mode == "plaintext":
        platform.env["AIDC_CERTS_DIR"] = "off"
    # Tokens outlive a long fuzzing run (AIDC_FUZZ_EXAMPLES), whose failed logins would block fresh ones.
    platform.env.update(
        AIDC_SERVING_METERING_INTERVAL_SECONDS="0.5",
        AIDC_TRAINING_RUNNER_THREADS="1",
        AIDC_AUTH_ACCESS_TOKEN_TTL_SECONDS="7200",
    )
    try:
        up = platform.cli("up", "--detach")
        assert up.returncode == 0, platform.diagnostics(up)
        match = re.search(r"password:\s+(\S+)", up.stdout)
        assert match is not None, up.stdout
        assert "tenant endpoints" in up.stdout, up.stdout
        running = RunningPlatform(platform, mode, match.group(1), load_settings(MeshSettings, platform.env))
        asyncio.run(_create_tenants(running))
        yield running
    finally:
        platform.cli("down", timeout=120)


@pytest.fixture(scope="package")
def mtls_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    """The platform as `aidc up` runs it by default: mutual TLS on the mesh path."""
    yield from _start(tmp_path_factory.mktemp("mtls"), "mtls")


@pytest.fixture(scope="package")
def plaintext_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlatform]:
    """The platform in plaintext loopback dev mode (AIDC_CERTS_DIR=off)."""
    yield from _start(tmp_path_factory.mktemp("plaintext"), "plaintext")


def kserve_descriptor_set() -> bytes:
    """Triton's KServe v2 service as a FileDescriptorSet, from the descriptors tritonclient ships (no .proto file of
    Triton's is copied): what a client in another language loads."""
    files: dict[str, FileDescriptor] = {}

    def add(descriptor: FileDescriptor) -> None:
        if descriptor.name in files:
            return
        for dependency in descriptor.dependencies:
            add(dependency)
        files[descriptor.name] = descriptor

    add(kserve_pb.DESCRIPTOR)
    out = descriptor_pb2.FileDescriptorSet()
    for descriptor in files.values():
        descriptor.CopyToProto(out.file.add())
    return out.SerializeToString()


def node_command() -> list[str]:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("the Node.js client needs node and its packages: run `make install` (npm ci in tests/clients/node)")
    return [node, str(NODE_DIR / "client.mjs")]


def run_node_client(running: RunningPlatform, work: Path, tiny_bert: Path, trace_id: str) -> None:
    """The Node.js client's walk through the tenant API as acme's developer (globex's for the refusals)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "keywords.csv").write_bytes(to_csv(keyword_dataset(300, seed=1)))
    (work / "tiny-bert.tar.gz").write_bytes(tiny_model_tar(tiny_bert))
    (work / "kserve.pb").write_bytes(kserve_descriptor_set())
    config = {
        "protos": str(ROOT / "protos"),
        "kserveDescriptorSet": str(work / "kserve.pb"),
        "addresses": {name: running.tenant_address(name) for name in SERVICE_NAMES},
        "caFile": str(running.ca_file) if running.ca_file else None,
        "account": {"tenant": "acme", "user": "dev", "password": PASSWORD},
        "otherAccount": {"tenant": "globex", "user": "dev", "password": PASSWORD},
        "dataset": {"name": "keywords", "csvFile": str(work / "keywords.csv")},
        "baseModel": {
            "name": "tiny-bert",
            "artifact": "bases/tiny-bert.tar.gz",
            "tarFile": str(work / "tiny-bert.tar.gz"),
        },
        "hyperparameters": HYPERPARAMETERS,
        "model": MODEL,
        "texts": TEXTS,
        "expectUsage": running.tls,
        "fineTunes": running.tls,
        "traceId": trace_id,
    }
    (work / "config.json").write_text(json.dumps(config))
    began = time.monotonic()
    done = subprocess.run(
        [*node_command(), str(work / "config.json")], capture_output=True, text=True, timeout=600, cwd=NODE_DIR
    )
    running.node_seconds = time.monotonic() - began
    running.node_trace_id = trace_id
    assert done.returncode == 0, f"node client failed:\n{done.stderr}\n{done.stdout}\n" + running.platform.diagnostics()
    running.node = json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="package")
def mtls_walk(
    mtls_platform: RunningPlatform,
    tiny_bert_dir: Path,  # noqa: F811 - the session fixture imported above
    tmp_path_factory: pytest.TempPathFactory,
) -> RunningPlatform:
    """The mutual-TLS platform after the Node.js client's walk (the other tests here build on what it left)."""
    run_node_client(mtls_platform, tmp_path_factory.mktemp("node-mtls"), tiny_bert_dir, secrets.token_hex(16))
    return mtls_platform


@pytest.fixture(scope="package")
def plaintext_walk(
    plaintext_platform: RunningPlatform,
    tiny_bert_dir: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> RunningPlatform:
    run_node_client(plaintext_platform, tmp_path_factory.mktemp("node-plain"), tiny_bert_dir, secrets.token_hex(16))
    return plaintext_platform
