"""Deployments through the real serving service: registry versions (real fine-tunes of a tiny BERT, exported by the
training service into a real storage service) written into the live repository of a real tritonserver, loaded,
probed, switched without failed requests, rolled back when loading fails, reloaded after Triton restarts; only
exports whose bytes are the ones the registry pinned are ever deployed or reloaded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from sqlalchemy import update
from transformers import AutoTokenizer

from services.gen.aidc.serving.v1 import serving_service_pb2 as pb
from services.gen.aidc.storage.v1 import storage_service_pb2 as storage_pb
from services.mesh.errors import AidcError, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable
from services.serving.client import TextClassifierClient
from services.serving.config import ServingSettings
from services.serving.pins import seal_export
from services.serving.registry import EXPORT_ROLES
from services.storage.schema import object_counters
from services.training.runner.tiny import keyword_dataset
from tests.serving.conftest import RunningServing, fine_tune, serving_env, start_serving
from tests.serving.sample_support import SAMPLE_DIR
from tests.serving.triton import TritonProcess
from tests.storage.conftest import RunningStorage, storage_database
from tests.training.conftest import RunningTraining

pytestmark = pytest.mark.slow

HELD_OUT = keyword_dataset(24, seed=4242)


async def _accuracy(classifier: TextClassifierClient, model: str = "keywords-clf") -> float:
    results = await classifier.classify(model, [text for text, _ in HELD_OUT])
    return sum(r.label == label for r, (_, label) in zip(results, HELD_OUT, strict=True)) / len(HELD_OUT)


def _local_labels(export: Path, texts: list[str]) -> list[str]:
    """What the exported TorchScript model predicts with the Hugging Face tokenizer, outside Triton."""
    tokenizer = AutoTokenizer.from_pretrained(export / "tokenizer")
    model = torch.jit.load(str(export / "model.pt"), map_location="cpu")
    labels = json.loads((export / "labels.json").read_text())
    batch = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.inference_mode():
        logits = model(batch["input_ids"], batch["attention_mask"])
    return [labels[i] for i in logits.argmax(dim=-1).tolist()]


async def _registry_pins(training: RunningTraining, version: int) -> dict[str, str]:
    """The SHA-256 the registry pinned for each export artifact of keywords-clf ``version``."""
    found = await training.client().get_model_version("keywords-clf", version=version)
    return {a.role: a.sha256 for a in found.artifacts if a.role in EXPORT_ROLES}


async def _stage(serving: RunningServing, training: RunningTraining, version: int, source: Path, damage: str) -> None:
    """Stages keywords-clf ``version``'s export by hand, copied from ``source`` (an export), damaged (``damage``:
    "model" or "tokenizer"), and sealed with the registry's own pins for it: an export that matches its pins and
    still cannot be served (as a faulty export of the training side would be)."""
    staged = serving.settings.serving_dir / "exports" / "acme__keywords-clf" / str(version)
    shutil.copytree(source, staged, ignore=shutil.ignore_patterns(".pins.json", "*.py", "__pycache__"))
    if damage == "model":
        (staged / "model.pt").write_bytes(b"not a torchscript archive")
    else:
        shutil.rmtree(staged / "tokenizer")
    seal_export(staged, await _registry_pins(training, version))


async def _swap_in_storage(storage: RunningStorage, training: RunningTraining, version: int, content: bytes) -> None:
    """acme/dev replaces keywords-clf ``version``'s model.pt in storage by other bytes under the same artifact name
    and version number: deletes it and uploads again. Storage never gives a number twice, so the test first lowers
    the artifact's version counter in storage's database: a stand-in for the storage defect of issue 11 (numbers
    reused), or for a storage database restored from an older backup."""
    found = await training.client().get_model_version("keywords-clf", version=version)
    [model] = [a for a in found.artifacts if a.role == "model"]
    files = storage.client("acme/dev")
    await files.delete("acme", model.name, kind=storage_pb.OBJECT_KIND_ARTIFACT, version=model.version)
    with storage_database(storage.settings) as engine, engine.begin() as conn:
        c = object_counters.c
        conn.execute(
            update(object_counters)
            .where(c.tenant == "acme", c.name == model.name)
            .values(last_version=model.version - 1)
        )
    swapped = await files.upload("acme", model.name, content, kind=storage_pb.OBJECT_KIND_ARTIFACT)
    assert (swapped.name, swapped.version) == (model.name, model.version)


class Traffic:
    """Sends classify requests back to back until stopped, recording the version that answered each one in order
    (or the error); a failure of the loop itself is raised when the block ends."""

    def __init__(self, classifier: TextClassifierClient) -> None:
        self._classifier = classifier
        self.answers: list[str] = []
        self.failures: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            try:
                [answer] = await self._classifier.classify("keywords-clf", ["the weather is great today"])
                self.answers.append(answer.model_version)
            except AidcError as error:
                self.failures.append(str(error))

    def versions(self) -> list[str]:
        """The answering versions in order, each run of one version collapsed: ["1", "2"] for a clean switch."""
        return [v for i, v in enumerate(self.answers) if i == 0 or self.answers[i - 1] != v]

    async def __aenter__(self) -> Traffic:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()  # the loop died: its exception is the test's
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _answered(traffic: Traffic, count: int, timeout: float = 120.0) -> None:
    """Waits until the traffic has had ``count`` answers (or a failure)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while len(traffic.answers) < count and not traffic.failures:
        assert asyncio.get_running_loop().time() < deadline, f"{len(traffic.answers)} answers in {timeout}s"
        await asyncio.sleep(0.05)


async def test_deploy_infer_switch_undeploy(
    storage: RunningStorage, training: RunningTraining, serving: RunningServing, tiny_bert_dir: Path
) -> None:
    assert await fine_tune(storage, training, tiny_bert_dir, seeds=(7, 8)) == [1, 2]
    client = serving.client()
    repository = serving.settings.model_repository_path

    first = await client.deploy("keywords-clf", version=1, wait=True)
    assert (first.state, first.version, first.target_version) == (pb.DEPLOYMENT_STATE_READY, 1, 0)
    assert first.triton_model_name == "acme__keywords-clf" and first.created_by.endswith("dev")
    assert sorted(p.name for p in (repository / "acme__keywords-clf").iterdir() if p.is_dir()) == ["1"]
    classifier = serving.classifier()
    assert await _accuracy(classifier) >= 0.5  # chance is 1/3
    # Raw text in: Triton's tokenization and model give exactly what the export gives with the HF tokenizer.
    export = serving.settings.serving_dir / "exports" / "acme__keywords-clf" / "1"
    served = [r.label for r in await classifier.classify("keywords-clf", [t for t, _ in HELD_OUT])]
    assert served == _local_labels(export, [t for t, _ in HELD_OUT])

    # Deploying the same again changes nothing.
    again = await client.deploy("keywords-clf", version=1, wait=True)
    assert again.update_time == first.update_time

    # Switch to version 2 while a client sends requests back to back: none fails, version 1 answers until version 2
    # does, and then only version 2.
    async with Traffic(serving.classifier()) as traffic:
        await _answered(traffic, 5)
        second = await client.deploy("keywords-clf", version=2, wait=True)
        await _answered(traffic, len(traffic.answers) + 5)
    assert (second.state, second.version) == (pb.DEPLOYMENT_STATE_READY, 2)
    assert traffic.failures == [] and traffic.versions() == ["1", "2"], (traffic.versions(), traffic.failures[:3])
    assert sorted(p.name for p in (repository / "acme__keywords-clf").iterdir() if p.is_dir()) == ["2"]
    assert await _accuracy(classifier) >= 0.5

    listed, _ = await client.list_deployments()
    assert [(d.model, d.version) for d in listed] == [("keywords-clf", 2)]
    assert (await serving.client("acme/viewer").get_deployment("keywords-clf")).version == 2

    removed = await client.undeploy("keywords-clf")
    assert removed.version == 2
    assert not (repository / "acme__keywords-clf").exists()
    with pytest.raises(NotFound):
        await client.get_deployment("keywords-clf")
    with pytest.raises(NotFound):
        await classifier.classify("keywords-clf", ["anything"])


async def test_a_failed_rollout_keeps_the_previous_version(
    storage: RunningStorage,
    training: RunningTraining,
    serving: RunningServing,
    triton: TritonProcess,
    tiny_bert_dir: Path,
) -> None:
    await fine_tune(storage, training, tiny_bert_dir, seeds=(7, 8))
    client = serving.client()
    await client.deploy("keywords-clf", version=1, wait=True)
    # Version 2's export matches its pins but its model.pt is no TorchScript: Triton fails to load it.
    await _stage(serving, training, 2, serving.settings.serving_dir / "exports" / "acme__keywords-clf" / "1", "model")

    async with Traffic(serving.classifier()) as traffic:
        await _answered(traffic, 1)
        with pytest.raises(FailedPrecondition, match="version 2"):
            await client.deploy("keywords-clf", version=2, wait=True)
        await _answered(traffic, len(traffic.answers) + 3)
    assert traffic.failures == [] and traffic.versions() == ["1"], (traffic.versions(), traffic.failures[:3])
    after = await client.get_deployment("keywords-clf")
    assert (after.state, after.version, after.target_version) == (pb.DEPLOYMENT_STATE_READY, 1, 0)
    assert "rollout of version 2 failed" in after.last_error and after.HasField("last_error_time")
    repository = serving.settings.model_repository_path / "acme__keywords-clf"
    assert sorted(p.name for p in repository.iterdir() if p.is_dir()) == ["1"]
    assert await _accuracy(serving.classifier()) >= 0.5
    with triton.client() as direct:  # one tenant's broken model leaves Triton ready for everyone else
        assert direct.is_server_ready()


async def test_a_failed_first_deploy_ends_failed_with_nothing_loaded(
    storage: RunningStorage, training: RunningTraining, serving: RunningServing, tiny_bert_dir: Path
) -> None:
    await fine_tune(storage, training, tiny_bert_dir)
    # A staged export missing its tokenizer: refused before Triton is asked to load anything.
    await _stage(serving, training, 1, SAMPLE_DIR, "tokenizer")
    with pytest.raises(FailedPrecondition, match="tokenizer"):
        await serving.client().deploy("keywords-clf", version=1, wait=True)
    failed = await serving.client().get_deployment("keywords-clf")
    assert (failed.state, failed.version) == (pb.DEPLOYMENT_STATE_FAILED, 0)
    assert failed.last_error
    assert not (serving.settings.model_repository_path / "acme__keywords-clf").exists()
    with pytest.raises(NotFound):
        await serving.classifier().classify("keywords-clf", ["anything"])


async def test_an_export_swapped_in_storage_is_refused_and_nothing_is_deployed(
    storage: RunningStorage,
    training: RunningTraining,
    serving: RunningServing,
    triton: TritonProcess,
    tiny_bert_dir: Path,
) -> None:
    """Issue 11 item 1: a developer swaps other TorchScript in under a registered version's artifact (name and
    version). Serving fetches by (name, version), so without digest pins Triton would load and run the swapped
    file. The deploy must fail with a clear status naming the mismatch, and nothing may reach Triton or the live
    repository; a version switch to such a version keeps the previous one serving."""
    assert await fine_tune(storage, training, tiny_bert_dir, seeds=(7, 8)) == [1, 2]
    await _swap_in_storage(storage, training, 1, (SAMPLE_DIR / "model.pt").read_bytes())
    client = serving.client()
    with pytest.raises(FailedPrecondition, match="does not match the registry.*nothing was deployed"):
        await client.deploy("keywords-clf", version=1, wait=True)
    failed = await client.get_deployment("keywords-clf")
    assert (failed.state, failed.version) == (pb.DEPLOYMENT_STATE_FAILED, 0)
    assert "SHA-256" in failed.last_error and "model.pt" in failed.last_error
    assert not (serving.settings.model_repository_path / "acme__keywords-clf").exists()
    assert not (serving.settings.serving_dir / "exports" / "acme__keywords-clf" / "1").exists()
    with triton.client() as direct:
        assert direct.get_model_repository_index(as_json=True).get("models", []) == []

    # Version 2 is intact and deploys; a later switch to the swapped version 1 is refused and 2 keeps serving.
    assert (await client.deploy("keywords-clf", version=2, wait=True)).version == 2
    with pytest.raises(FailedPrecondition, match="does not match the registry"):
        await client.deploy("keywords-clf", version=1, wait=True)
    after = await client.get_deployment("keywords-clf")
    assert (after.state, after.version) == (pb.DEPLOYMENT_STATE_READY, 2)
    repository = serving.settings.model_repository_path / "acme__keywords-clf"
    assert sorted(p.name for p in repository.iterdir() if p.is_dir()) == ["2"]
    assert await _accuracy(serving.classifier()) >= 0.5

    # A staged export changed on disk no longer matches its pins: the next rollout fetches it again (checked against
    # the registry) and writes the live version from that, not from what it found.
    staged = serving.settings.serving_dir / "exports" / "acme__keywords-clf" / "2"
    pinned_labels = (staged / "labels.json").read_bytes()
    (staged / "labels.json").write_text('["spam", "ham", "eggs"]')
    reshaped = await client.deploy("keywords-clf", version=2, max_batch_size=4, wait=True)
    assert (reshaped.state, reshaped.version, reshaped.max_batch_size) == (pb.DEPLOYMENT_STATE_READY, 2, 4)
    assert (staged / "labels.json").read_bytes() == pinned_labels
    assert (repository / "2" / "labels.json").read_bytes() == pinned_labels


async def test_bad_deploy_requests_change_nothing(
    storage: RunningStorage, training: RunningTraining, serving: RunningServing, tiny_bert_dir: Path
) -> None:
    await fine_tune(storage, training, tiny_bert_dir)
    client = serving.client()
    cases: list[tuple[dict[str, object], type[AidcError], str]] = [
        ({"model": "no-such-model"}, NotFound, "no-such-model"),
        ({"model": "keywords-clf", "version": 9}, NotFound, "9"),
        ({"model": "keywords-clf", "alias": "production"}, NotFound, "production"),
        ({"model": "keywords-clf", "version": 1, "alias": "production"}, InvalidArgument, "not both"),
        ({"model": "keywords-clf", "version": -1}, InvalidArgument, "negative"),
        ({"model": "Bad Name"}, InvalidArgument, "not a registry model name"),
        ({"model": "keywords-clf", "instance_count": 99}, InvalidArgument, "instance_count"),
        ({"model": "keywords-clf", "max_batch_size": -1}, InvalidArgument, "max_batch_size"),
        ({"model": "keywords-clf", "max_batch_size": 5000}, InvalidArgument, "max_batch_size"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            await client.deploy(wait=True, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied):
        await serving.client("globex/dev").deploy("keywords-clf", tenant="acme", wait=True)
    with pytest.raises(PermissionDenied):
        await serving.client("acme/viewer").deploy("keywords-clf", wait=True)
    with pytest.raises(NotFound):
        await serving.client("globex/dev").deploy("keywords-clf", wait=True)  # globex has no such model
    with pytest.raises(NotFound):
        await client.undeploy("keywords-clf")
    with pytest.raises(InvalidArgument):
        await client.list_deployments(page_token="garbage")
    assert (await client.list_deployments())[0] == []
    assert list(serving.settings.model_repository_path.iterdir()) == []


async def test_triton_restart_and_service_restart_reload_deployments(
    storage: RunningStorage,
    training: RunningTraining,
    serving: RunningServing,
    triton: TritonProcess,
    tiny_bert_dir: Path,
) -> None:
    await fine_tune(storage, training, tiny_bert_dir)
    await serving.client().deploy("keywords-clf", wait=True)
    classifier = serving.classifier()
    assert await _accuracy(classifier) >= 0.5

    triton.kill()
    with pytest.raises(Unavailable):
        await classifier.classify("keywords-clf", ["the weather is great"])
    # While Triton is down, someone changes the model Triton would load next: the reload must check the live
    # version against the pinned export and write it again, never load what it found.
    live = serving.settings.model_repository_path / "acme__keywords-clf" / "1" / "model.pt"
    export = serving.settings.serving_dir / "exports" / "acme__keywords-clf" / "1"
    live.write_bytes((SAMPLE_DIR / "model.pt").read_bytes())
    triton.start()  # same ports, same repository; Triton remembers nothing it loaded
    await _eventually(lambda: _accuracy(classifier), timeout=60)
    assert await _accuracy(classifier) >= 0.5
    assert live.read_bytes() == (export / "model.pt").read_bytes()

    # The serving service restarts (and Triton with it, as after a machine reboot): the deployment comes back,
    # the live version checked against its export again.
    await serving.stop()
    triton.stop()
    live.write_bytes(b"changed again")
    triton.start()
    settings = ServingSettings.from_env(
        serving_env(
            serving.settings.data_dir,
            serving.settings.auth_addr,
            storage.address,
            training.settings.training_addr,
            triton,
            serving.settings.certs_dir,
            serving.settings.database_url,
        )
    )
    restarted = await start_serving(settings, serving.tokens)
    try:
        classifier = restarted.classifier()
        await _eventually(lambda: _accuracy(classifier), timeout=60)
        assert (await restarted.client().get_deployment("keywords-clf")).state == pb.DEPLOYMENT_STATE_READY
        assert live.read_bytes() == (export / "model.pt").read_bytes()
    finally:
        await restarted.stop()


async def _eventually(probe: object, timeout: float) -> None:
    """Retries ``probe()`` until it returns without an error or ``timeout`` seconds passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        with contextlib.suppress(AidcError):
            await probe()  # type: ignore[operator]
            return
        if loop.time() > deadline:
            await probe()  # type: ignore[operator]
        await asyncio.sleep(0.3)
