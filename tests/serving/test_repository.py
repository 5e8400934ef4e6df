"""The live repository writer and the text_classifier model, on a real Triton (python backend, CPU).

One Triton serves the whole module; each test deploys under its own name. The libtorch flavour's pytorch_libtorch
model cannot load here (this Triton build ships only the python backend): its configs and files are checked as
written, and its two python steps (tokenize, label) are loaded and run for real.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, serialize_byte_tensor

from services.mesh.errors import FailedPrecondition, InvalidArgument
from services.serving.repository import (
    DeploymentShape,
    ExportBundle,
    LiveRepository,
    check_probe_result,
    probe_request,
)
from tests.serving.sample_support import (
    OBVIOUS_TEXTS,
    SAMPLE_DIR,
    SampleReference,
    copy_sample,
    ids_inputs,
    load_text_classifier,
    text_input,
)
from tests.serving.triton import TritonProcess

SERVED = "acme__sentiment"
LONG_TEXT = " ".join(["the wonderful garden was measured and listed"] * 12)
TEXTS = [text for text, _ in OBVIOUS_TEXTS]
EXPECTED = [label for _, label in OBVIOUS_TEXTS]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The reference forward on one thread, like the served one (TORCH_NUM_THREADS=1): same kernels, same bits."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def sample() -> ExportBundle:
    return ExportBundle.load(SAMPLE_DIR)


@pytest.fixture(scope="module")
def reference(sample: ExportBundle) -> SampleReference:
    return SampleReference(sample)


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    work = tmp_path_factory.mktemp("triton")
    process = TritonProcess(work / "model_repository", work)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def live(triton: TritonProcess) -> LiveRepository:
    return LiveRepository(triton.repository)


@pytest.fixture(scope="module")
def client(triton: TritonProcess) -> Iterator[triton_grpc.InferenceServerClient]:
    with triton.client() as grpc_client:
        yield grpc_client


@pytest.fixture(scope="module")
def served(live: LiveRepository, client: triton_grpc.InferenceServerClient, sample: ExportBundle) -> str:
    """The sample deployed as version 1, for tests that only infer. Batches of up to 8 rows; the batcher waits up
    to 20 ms for requests to join one, so a burst of requests is batched however slowly this machine sends it."""
    live.write_version(SERVED, 1, sample)
    live.write_config(SERVED, [1], DeploymentShape(max_queue_delay_microseconds=20_000), sample)
    client.load_model(SERVED)
    return SERVED


def _config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def _labels(result: triton_grpc.InferResult) -> list[str]:
    return [value.decode() for value in result.as_numpy("LABEL").ravel()]


# ---- config text and layout (no Triton) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "python_env"),
    [
        (DeploymentShape(instance_count=2, max_batch_size=16, max_queue_delay_microseconds=500), "/opt/envs/aidc"),
        (DeploymentShape(max_batch_size=0), ""),
    ],
)
def test_python_flavour_config(tmp_path: Path, sample: ExportBundle, shape: DeploymentShape, python_env: str) -> None:
    live = LiveRepository(tmp_path, python_env=python_env)
    for version in (1, 3):
        live.write_version("acme__m", version, sample)
    live.write_config("acme__m", [3, 1], shape, sample)

    config = _config(tmp_path / "acme__m" / "config.pbtxt")
    row = [] if shape.batching else [-1]
    assert (config.name, config.backend, config.max_batch_size) == ("acme__m", "python", shape.max_batch_size)
    assert list(config.version_policy.specific.versions) == [1, 3]
    assert [(t.name, t.data_type, list(t.dims), t.optional, t.allow_ragged_batch) for t in config.input] == [
        ("TEXT", mc.TYPE_STRING, [*row, 1], True, False),
        ("INPUT_IDS", mc.TYPE_INT64, [*row, -1], True, shape.batching),
        ("ATTENTION_MASK", mc.TYPE_INT64, [*row, -1], True, shape.batching),
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("LOGITS", mc.TYPE_FP32, [*row, 3]),
        ("LABEL", mc.TYPE_STRING, [*row, 1]),
    ]
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (shape.instance_count, mc.ModelInstanceGroup.KIND_CPU)
    ]
    assert config.HasField("dynamic_batching") == shape.batching
    assert config.dynamic_batching.max_queue_delay_microseconds == shape.max_queue_delay_microseconds
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters == {
        "AIDC_STEP": "classify",
        "labels": '["negative", "neutral", "positive"]',
        **({"EXECUTION_ENV_PATH": python_env} if python_env else {}),
    }
    assert _files(tmp_path / "acme__m" / "3") == {
        "model.py",
        "model.pt",
        "labels.json",
        "model_config.json",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    }


def test_libtorch_flavour_layout_and_configs(tmp_path: Path, sample: ExportBundle) -> None:
    """The GPU flavour (pytorch_libtorch cannot load on this Triton): an ensemble of tokenize -> net -> label."""
    live = LiveRepository(tmp_path, flavour="libtorch", python_env="/opt/envs/aidc")
    for version in (1, 2):
        live.write_version("acme__m", version, sample)
    live.write_config("acme__m", [1, 2], DeploymentShape(instance_count=2, max_batch_size=4), sample)

    assert _files(tmp_path / "acme__m__tokenize" / "2") == {
        "model.py",
        "model_config.json",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    }
    assert _files(tmp_path / "acme__m__net" / "2") == {"model.pt"}
    assert (tmp_path / "acme__m__net" / "2" / "model.pt").read_bytes() == (SAMPLE_DIR / "model.pt").read_bytes()
    assert _files(tmp_path / "acme__m__label" / "2") == {"model.py", "labels.json", "model_config.json"}
    assert (tmp_path / "acme__m" / "2").is_dir() and _files(tmp_path / "acme__m") == {"config.pbtxt"}

    ensemble = _config(tmp_path / "acme__m" / "config.pbtxt")
    assert (ensemble.platform, ensemble.max_batch_size, list(ensemble.version_policy.specific.versions)) == (
        "ensemble",
        4,
        [1, 2],
    )
    assert [(t.name, list(t.dims)) for t in ensemble.input] == [("TEXT", [1])]
    assert [(t.name, list(t.dims)) for t in ensemble.output] == [("LOGITS", [3]), ("LABEL", [1])]
    assert [
        (s.model_name, s.model_version, dict(s.input_map), dict(s.output_map))
        for s in ensemble.ensemble_scheduling.step
    ] == [
        ("acme__m__tokenize", 2, {"TEXT": "TEXT"}, {"INPUT_IDS": "input_ids", "ATTENTION_MASK": "attention_mask"}),
        ("acme__m__net", 2, {"INPUT__0": "input_ids", "INPUT__1": "attention_mask"}, {"OUTPUT__0": "LOGITS"}),
        ("acme__m__label", 2, {"LOGITS": "LOGITS"}, {"LABEL": "LABEL"}),
    ]
    assert not ensemble.instance_group and not ensemble.HasField("dynamic_batching")

    net = _config(tmp_path / "acme__m__net" / "config.pbtxt")
    assert (net.platform, net.backend) == ("pytorch_libtorch", "")
    assert [(t.name, t.data_type, list(t.dims), t.allow_ragged_batch) for t in net.input] == [
        ("INPUT__0", mc.TYPE_INT64, [-1], False),
        ("INPUT__1", mc.TYPE_INT64, [-1], False),
    ]
    assert [(t.name, list(t.dims)) for t in net.output] == [("OUTPUT__0", [3])]
    assert [(g.count, g.kind) for g in net.instance_group] == [(2, mc.ModelInstanceGroup.KIND_GPU)]
    assert net.HasField("dynamic_batching") and "EXECUTION_ENV_PATH" not in net.parameters

    for step in ("tokenize", "label"):
        config = _config(tmp_path / f"acme__m__{step}" / "config.pbtxt")
        assert config.backend == "python" and list(config.version_policy.specific.versions) == [1, 2]
        assert [(g.count, g.kind) for g in config.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
        assert config.parameters["AIDC_STEP"].string_value == step
        assert config.parameters["EXECUTION_ENV_PATH"].string_value == "/opt/envs/aidc"

    assert live.load_order("acme__m") == ["acme__m"]
    assert live.names() == ["acme__m"] and live.versions("acme__m") == [1, 2]
    live.remove_version("acme__m", 1)
    assert not any((tmp_path / name / "1").exists() for name in ("acme__m", "acme__m__tokenize", "acme__m__net"))
    live.remove("acme__m")
    assert list(tmp_path.iterdir()) == []


def _two_label_export(tmp_path: Path) -> ExportBundle:
    root = copy_sample(tmp_path / "two-labels")
    config = json.loads((root / "model_config.json").read_text())
    config.update(labels=["negative", "positive"], num_labels=2)
    (root / "model_config.json").write_text(json.dumps(config))
    (root / "labels.json").write_text(json.dumps(["negative", "positive"]))
    return ExportBundle.load(root)


def test_logits_width_is_open_while_versions_disagree_on_the_classes(tmp_path: Path, sample: ExportBundle) -> None:
    live = LiveRepository(tmp_path / "repo")
    two_labels = _two_label_export(tmp_path)
    live.write_version("acme__m", 1, sample)
    live.write_version("acme__m", 2, two_labels)
    config = tmp_path / "repo" / "acme__m" / "config.pbtxt"

    live.write_config("acme__m", [1, 2], DeploymentShape(), two_labels)
    assert [list(t.dims) for t in _config(config).output] == [[-1], [1]]
    live.write_config("acme__m", [2], DeploymentShape(), two_labels)
    assert [list(t.dims) for t in _config(config).output] == [[2], [1]]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda live, b: live.write_config("acme__m", [1, 2], DeploymentShape(), b), FailedPrecondition,
         "version 2 of acme__m is not written"),
        (lambda live, b: live.write_config("acme__m", [], DeploymentShape(), b), InvalidArgument, "at least one"),
        (lambda live, b: live.write_version("acme__m", 0, b), InvalidArgument, "positive integer"),
        (lambda live, b: live.write_version("../escape", 1, b), InvalidArgument, "not a Triton model name"),
        (lambda live, b: DeploymentShape(instance_count=0), InvalidArgument, "instance_count"),
        (lambda live, b: DeploymentShape(max_batch_size=-1), InvalidArgument, "max_batch_size"),
        (lambda live, b: DeploymentShape(max_queue_delay_microseconds=-5), InvalidArgument, "max_queue_delay"),
        (lambda live, b: LiveRepository(live.root, flavour="onnx"), InvalidArgument, "python, libtorch"),
    ],
)  # fmt: skip
def test_bad_writes_are_refused(
    tmp_path: Path, sample: ExportBundle, call: Callable[..., Any], error: type[Exception], message: str
) -> None:
    live = LiveRepository(tmp_path)
    live.write_version("acme__m", 1, sample)
    with pytest.raises(error, match=message):
        call(live, sample)


def _edit_json(name: str, edit: Callable[[Any], Any]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        (root / name).write_text(json.dumps(edit(json.loads((root / name).read_text()))))

    return apply


def _replace_by_link(path: Path, target: str) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.symlink_to(target)


def _without_libtorch_names(config: dict[str, Any]) -> dict[str, Any]:
    for tensor in config["inputs"]:
        tensor.pop("libtorch_name")
    return config


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: (root / "model.pt").unlink(), "model.pt is missing"),
        (lambda root: (root / "model_config.json").write_text("{not json"), "model_config.json is not JSON"),
        (lambda root: (root / "tokenizer" / "tokenizer.json").unlink(), "tokenizer/tokenizer.json"),
        (_edit_json("model_config.json", lambda c: {**c, "format": "onnx"}), "format is 'onnx', not 'torchscript'"),
        (_edit_json("model_config.json", lambda c: {**c, "task": "token-classification"}), "task is"),
        (_edit_json("labels.json", lambda labels: labels[::-1]), "disagrees with model_config.json labels"),
        (_edit_json("labels.json", lambda labels: labels[:2]), "disagrees with model_config.json labels"),
        (_edit_json("labels.json", lambda labels: {"classes": labels}), "labels.json must hold a JSON array"),
        (_edit_json("model_config.json", _without_libtorch_names), "libtorch_name"),
        # Paths from the export stay inside it: no other file as the model, no links out.
        (_edit_json("model_config.json", lambda c: {**c, "file": "../../escape.pt"}), "file must be 'model.pt'"),
        (_edit_json("model_config.json", lambda c: {**c, "file": "/etc/hostname"}), "file must be 'model.pt'"),
        (_edit_json("model_config.json", lambda c: {**c, "file": "tokenizer/vocab.txt"}), "file must be 'model.pt'"),
        (lambda root: _replace_by_link(root / "model.pt", "/etc/hostname"), "'model.pt' is a link"),
        (lambda root: _replace_by_link(root / "labels.json", "/etc/hostname"), "'labels.json' is a link"),
        (lambda root: (root / "tokenizer" / "extra").symlink_to("/etc"), "'tokenizer/extra' is a link"),
        (lambda root: _replace_by_link(root / "tokenizer", "/etc"), "'tokenizer' is a link"),
    ],
)
def test_export_bundle_rejects_unusable_exports(tmp_path: Path, damage: Callable[[Path], None], message: str) -> None:
    root = copy_sample(tmp_path / "export")
    damage(root)
    with pytest.raises(FailedPrecondition, match="the export cannot be served: .*" + message):
        ExportBundle.load(root)


def test_a_half_written_version_is_never_visible(tmp_path: Path) -> None:
    live = LiveRepository(tmp_path / "repo")
    bundle = ExportBundle.load(copy_sample(tmp_path / "export"))
    live.write_version("acme__m", 1, bundle)
    live.write_version("acme__m", 1, bundle)  # rewriting a version is fine
    written = {name: (tmp_path / "repo" / "acme__m" / "1" / name).read_bytes() for name in ("model.pt", "labels.json")}

    (bundle.root / "labels.json").unlink()  # copying now fails after model.py, model.pt and the tokenizer
    for version in (2, 1):
        with pytest.raises(FileNotFoundError):
            live.write_version("acme__m", version, bundle)

    assert live.versions("acme__m") == [1]
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["acme__m"]  # no staging left behind
    assert {name: (tmp_path / "repo" / "acme__m" / "1" / name).read_bytes() for name in written} == written


def test_tokenizer_gives_hugging_faces_ids(reference: SampleReference) -> None:
    """The model's fast tokenizer (no transformers in the Triton stub) against AutoTokenizer: special tokens,
    truncation of a long text, unknown characters, padding to the longest text or to the maximum length."""
    classifier = load_text_classifier()
    files = classifier.ExportFiles(SAMPLE_DIR)
    texts = [*TEXTS, LONG_TEXT, "", "ZEBRAS! wonderful?"]

    ids, mask = classifier.encode(files.tokenizer(pad_to_max=False), [texts])
    want_ids, want_mask = reference.encode(texts)
    assert ids.tolist() == want_ids.tolist() and mask.tolist() == want_mask.tolist()
    assert ids.shape[1] == 32 and ids[len(TEXTS), -1] == reference.tokenizer.sep_token_id
    assert set(ids[:, 0]) == {reference.tokenizer.cls_token_id}

    fixed_ids, fixed_mask = classifier.encode(files.tokenizer(pad_to_max=True), [texts[:2], texts[2:]])
    want_ids, want_mask = reference.encode(texts, padding="max_length")
    assert fixed_ids.tolist() == want_ids.tolist() and fixed_mask.tolist() == want_mask.tolist()


# ---- probe -----------------------------------------------------------------------------------------------------


def _infer_result(**outputs: np.ndarray) -> triton_grpc.InferResult:
    """A real InferResult over a hand-made response: answers no healthy model gives."""
    response = service_pb2.ModelInferResponse(model_name=SERVED, model_version="1")
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=np_to_triton_dtype(array.dtype), shape=list(array.shape))
        data = serialize_byte_tensor(array).item() if array.dtype == np.object_ else array.tobytes()
        response.raw_output_contents.append(data)
    return triton_grpc.InferResult(response)


_LOGITS = np.array([[2.0, 0.5, -1.0]], dtype=np.float32)  # argmax: "negative"


def _label(*rows: str) -> np.ndarray:
    return np.array([[row.encode()] for row in rows], dtype=np.object_)


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (_infer_result(LOGITS=_LOGITS), "lacks LABEL"),
        (_infer_result(LOGITS=_LOGITS[:, :2], LABEL=_label("negative")), r"\[1, 3\]"),
        (_infer_result(LOGITS=_LOGITS * np.nan, LABEL=_label("negative")), "not finite"),
        (_infer_result(LOGITS=_LOGITS, LABEL=_label("maybe")), "'maybe' is not a class of the export"),
        (_infer_result(LOGITS=_LOGITS, LABEL=_label("positive")), "argmax"),
        (_infer_result(LOGITS=_LOGITS, LABEL=_label("negative", "x")), r"\[2, 1\]"),
    ],
)
def test_probe_check_rejects_wrong_answers(sample: ExportBundle, result: triton_grpc.InferResult, message: str) -> None:
    with pytest.raises(FailedPrecondition, match=message):
        check_probe_result(sample, result)


def test_probe_passes_on_a_served_version(
    served: str, client: triton_grpc.InferenceServerClient, sample: ExportBundle
) -> None:
    inputs, outputs = probe_request(sample)
    result = client.infer(served, inputs, outputs=[triton_grpc.InferRequestedOutput(name) for name in outputs])
    check_probe_result(sample, result)


# ---- python flavour on Triton ----------------------------------------------------------------------------------


def test_text_requests(served: str, client: triton_grpc.InferenceServerClient, reference: SampleReference) -> None:
    result = client.infer(served, [text_input(TEXTS)])

    assert _labels(result) == EXPECTED
    logits = result.as_numpy("LOGITS")
    assert np.abs(logits - reference.logits(*reference.encode(TEXTS))).max() <= 1e-4
    assert np.abs(logits - reference.text_logits(TEXTS)).max() <= 1e-4
    assert result.get_response().model_version == "1"


def test_token_id_requests_match_torchscript_exactly(
    served: str, client: triton_grpc.InferenceServerClient, reference: SampleReference
) -> None:
    ids, mask = reference.encode(TEXTS)
    with_mask = client.infer(served, ids_inputs(ids, mask))
    default_mask = client.infer(served, ids_inputs(ids))  # the mask defaults to ids != pad

    want = reference.logits(ids, mask)
    assert np.array_equal(with_mask.as_numpy("LOGITS"), want)
    assert np.array_equal(default_mask.as_numpy("LOGITS"), want)
    assert _labels(with_mask) == EXPECTED


async def test_concurrent_requests_are_batched_and_bad_ones_fail_alone(
    served: str, triton: TritonProcess, reference: SampleReference
) -> None:
    """A burst of text requests (1-3 rows) and id requests (different lengths) with bad ones among them: Triton's
    dynamic batcher hands them to the model in batches (fewer executions than requests), every good request gets
    its own rows' answer, and each bad one gets its own error.

    Triton batches only requests that send the same set of inputs (TEXT with TEXT, INPUT_IDS + ATTENTION_MASK
    with INPUT_IDS + ATTENTION_MASK), so the bad requests that can share a batch with good ones send those sets.
    """
    ids, mask = reference.encode(TEXTS[:1])
    short_mask = f"ATTENTION_MASK shape [1, {ids.shape[1] - 1}] differs from INPUT_IDS shape [1, {ids.shape[1]}]"
    bad = [
        (ids_inputs(np.array([[2, 5000, 3]]), np.ones((1, 3))), "token id 5000, outside this model's vocabulary"),
        (ids_inputs(np.full((1, 40), 5), np.ones((1, 40))), "must hold 1 to 32 tokens per row, got 40"),
        (ids_inputs(ids, mask[:, :-1]), short_mask),
        ([_tensor("TEXT", np.array([[b"\xff wonderful"]], dtype=np.object_))], "TEXT must be UTF-8"),
        ([_tensor("ATTENTION_MASK", mask)], "ATTENTION_MASK goes with INPUT_IDS"),
        ([text_input(TEXTS[:1]), *ids_inputs(ids)], "send TEXT or INPUT_IDS, not both"),
    ]
    requests: list[tuple[list[triton_grpc.InferInput], list[str] | str]] = []
    for i in range(36):
        texts = [TEXTS[(i + k) % len(TEXTS)] for k in range(1 + i % 3)]
        requests.append(([text_input(texts)] if i < 18 else ids_inputs(*reference.encode(texts)), texts))
        if i % 6 == 5:
            requests.append(bad[i // 6])

    async with triton_aio.InferenceServerClient(triton.grpc_addr, creds=triton.access.credentials()) as aio:
        before = await _executions(aio, served)
        answers = await asyncio.gather(*(aio.infer(served, inputs) for inputs, _ in requests), return_exceptions=True)
        # Triton counts a request in its statistics when it releases it, which can come just after the answer.
        deadline = time.monotonic() + 10
        after = await _executions(aio, served)
        while after[1] - before[1] < len(requests) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            after = await _executions(aio, served)

    for answer, (_, expected) in zip(answers, requests, strict=True):
        if isinstance(expected, str):
            assert isinstance(answer, InferenceServerException), answer
            assert answer.status() == "StatusCode.INVALID_ARGUMENT" and expected in str(answer.message())
        else:
            assert isinstance(answer, triton_grpc.InferResult), answer
            assert _labels(answer) == [dict(OBVIOUS_TEXTS)[text] for text in expected]
            assert np.abs(answer.as_numpy("LOGITS") - reference.text_logits(expected)).max() <= 1e-4
    executions, answered = after[0] - before[0], after[1] - before[1]
    assert answered == len(requests) and executions <= len(requests) // 2, (executions, answered)


def _tensor(name: str, array: np.ndarray) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


async def _executions(aio: triton_aio.InferenceServerClient, name: str) -> tuple[int, int]:
    """(model executions, requests answered with or without error) so far."""
    stats = (await aio.get_inference_statistics(name, "1")).model_stats[0]
    return stats.execution_count, stats.inference_stats.success.count + stats.inference_stats.fail.count


def test_unbatched_deployment(
    live: LiveRepository, client: triton_grpc.InferenceServerClient, sample: ExportBundle, reference: SampleReference
) -> None:
    """max_batch_size 0: the config's dims carry the row dimension and the model takes the same tensors."""
    live.write_version("acme__unbatched", 1, sample)
    live.write_config("acme__unbatched", [1], DeploymentShape(max_batch_size=0), sample)
    client.load_model("acme__unbatched")
    try:
        by_text = client.infer("acme__unbatched", [text_input(TEXTS)])
        ids, mask = reference.encode(TEXTS)
        by_ids = client.infer("acme__unbatched", ids_inputs(ids, mask))
    finally:
        client.unload_model("acme__unbatched")
    assert _labels(by_text) == EXPECTED
    assert np.array_equal(by_ids.as_numpy("LOGITS"), reference.logits(ids, mask))


def test_versions_roll_out_and_the_deployment_is_removed(
    live: LiveRepository, client: triton_grpc.InferenceServerClient, sample: ExportBundle, tmp_path: Path
) -> None:
    name = "acme__rollout"
    second = ExportBundle.load(copy_sample(tmp_path / "v2"))

    def answered_by(version: str = "") -> str:
        result = client.infer(name, [text_input(TEXTS[:1])], model_version=version)
        assert _labels(result) == EXPECTED[:1]
        return str(result.get_response().model_version)

    live.write_version(name, 1, sample)
    live.write_config(name, [1], DeploymentShape(), sample)
    client.load_model(name)
    assert answered_by() == "1"

    live.write_version(name, 2, second)
    live.write_config(name, [1, 2], DeploymentShape(), second)
    client.load_model(name)
    assert (answered_by("1"), answered_by("2"), answered_by()) == ("1", "2", "2")

    live.write_config(name, [2], DeploymentShape(), second)
    client.load_model(name)
    assert answered_by() == "2"
    with pytest.raises(InferenceServerException):
        answered_by("1")
    live.remove_version(name, 1)
    assert live.versions(name) == [2]

    client.unload_model(name, unload_dependents=True)
    live.remove(name)
    assert name not in live.names() and not (live.root / name).exists()
    with pytest.raises(InferenceServerException):
        client.load_model(name)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: _edit_json("model_config.json", lambda c: {**c, "file": "../escape.pt"})(v), "inside"),
        (lambda v: _edit_json("model_config.json", lambda c: {**c, "file": str(v.parent / "escape.pt")})(v), "inside"),
        (lambda v: _replace_by_link(v / "model.pt", str(v.parent / "escape.pt")), "is a link"),
        (lambda v: _edit_json("model_config.json", lambda c: _tokenizer_dir(c, "../elsewhere"))(v), "inside"),
        (lambda v: _replace_by_link(v / "tokenizer", str(v.parent / "elsewhere")), "is a link"),
    ],
    ids=["file with ..", "absolute file", "model.pt a link", "tokenizer dir with ..", "tokenizer a link"],
)
def test_the_model_reads_only_files_of_its_version_directory(
    live: LiveRepository,
    client: triton_grpc.InferenceServerClient,
    sample: ExportBundle,
    change: Callable[[Path], None],
    message: str,
) -> None:
    """Triton runs model.py on whatever a version directory holds: a model_config.json (or a link) pointing at a
    file outside it, even a loadable model, must make the load fail, never be read."""
    name = "acme__confined"
    live.write_version(name, 1, sample)
    live.write_config(name, [1], DeploymentShape(), sample)
    version_dir = live.root / name / "1"
    shutil.copyfile(sample.root / "model.pt", live.root / name / "escape.pt")
    shutil.copytree(sample.root / "tokenizer", live.root / name / "elsewhere", dirs_exist_ok=True)
    change(version_dir)
    try:
        with pytest.raises(InferenceServerException, match=message):
            client.load_model(name)
        assert not client.is_model_ready(name)
    finally:
        client.unload_model(name)
        live.remove(name)


def _tokenizer_dir(config: dict[str, Any], directory: str) -> dict[str, Any]:
    return {**config, "tokenizer": {**config["tokenizer"], "dir": directory}}


def test_libtorch_flavour_python_steps_on_triton(
    triton: TritonProcess, client: triton_grpc.InferenceServerClient, sample: ExportBundle, reference: SampleReference
) -> None:
    """Of the libtorch flavour only pytorch_libtorch is missing here: its tokenize and label steps run for real."""
    live = LiveRepository(triton.repository, flavour="libtorch")
    live.write_version("acme__gpu", 1, sample)
    live.write_config("acme__gpu", [1], DeploymentShape(), sample)
    texts = [*TEXTS[:3], LONG_TEXT]
    logits = reference.text_logits(texts)
    for step in ("acme__gpu__tokenize", "acme__gpu__label"):
        client.load_model(step)
    try:
        tokens = client.infer("acme__gpu__tokenize", [text_input(texts)])
        logits_input = triton_grpc.InferInput("LOGITS", list(logits.shape), "FP32")
        logits_input.set_data_from_numpy(logits)
        labels = client.infer("acme__gpu__label", [logits_input])
    finally:
        for step in ("acme__gpu__tokenize", "acme__gpu__label"):
            client.unload_model(step)

    want_ids, want_mask = reference.encode(texts, padding="max_length")
    assert tokens.as_numpy("INPUT_IDS").tolist() == want_ids.tolist()
    assert tokens.as_numpy("ATTENTION_MASK").tolist() == want_mask.tolist()
    assert _labels(labels) == [*EXPECTED[:3], sample.labels[int(logits[3].argmax())]]
