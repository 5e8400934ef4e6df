"""The writer of Triton's live model repository: deployments built from training exports, in two flavours.

A deployment is one Triton model named ``<tenant>__<model>`` (routes.triton_model_name) whose versions are
registry versions. Clients send TEXT (or token ids) and get LOGITS and LABEL, whichever flavour serves it:

    python (CPU here)                           libtorch (NGC Triton on GPUs)
    <name>/config.pbtxt    python backend       <name>/config.pbtxt            ensemble TEXT -> LOGITS, LABEL
    <name>/<v>/model.py    (text_classifier)    <name>/<v>/                    (empty: an ensemble has no files)
    <name>/<v>/model.pt                         <name>__tokenize/<v>/...       python: TEXT -> INPUT_IDS, MASK
    <name>/<v>/tokenizer/                       <name>__net/<v>/model.pt       pytorch_libtorch: ids -> logits
    <name>/<v>/labels.json                      <name>__label/<v>/...          python: LOGITS -> LABEL
    <name>/<v>/model_config.json

Triton reads a model's files only when told to load it (explicit model control), so the writer's promises are about
what a load can see: a version directory appears whole (staged beside it, then renamed) and config.pbtxt is
replaced whole. Config text is built here, from Triton's own protobuf messages, and nowhere else.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tritonclient.grpc as triton_grpc
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from services.mesh.errors import FailedPrecondition, InvalidArgument
from services.mesh.files import PRIVATE_DIR_MODE, private_dir, sha256_file
from services.serving.config import FLAVOURS
from services.serving.pins import export_files as export_files_of

if TYPE_CHECKING:
    from services.serving.s3mirror import S3RepositoryMirror

__all__ = [
    "DeploymentShape",
    "ExportBundle",
    "LABELS_PARAMETER",
    "LiveRepository",
    "TEXT_CLASSIFIER_MODEL",
    "check_probe_result",
    "probe_request",
]

#: The python-backend model every python part of a deployment runs (copied into each version directory).
TEXT_CLASSIFIER_MODEL = Path(__file__).resolve().parents[2] / "model_repository" / "text_classifier" / "model.py"

MODEL_PY = "model.py"
MODEL_FILE = "model.pt"
CONFIG_FILE = "model_config.json"
LABELS_FILE = "labels.json"
#: Model config parameter holding the class names.
LABELS_PARAMETER = "labels"
TOKENIZER_DIR = "tokenizer"
CONFIG_PBTXT = "config.pbtxt"

TEXT, INPUT_IDS, ATTENTION_MASK, LOGITS, LABEL = "TEXT", "INPUT_IDS", "ATTENTION_MASK", "LOGITS", "LABEL"
#: Suffixes of the libtorch flavour's composing models. Model names are lowercase letters, digits and '-', and
#: tenants never contain "__", so "<tenant>__<model>__net" cannot be another deployment's name.
TOKENIZE, NET, LABEL_STEP = "__tokenize", "__net", "__label"
_PART_SUFFIXES = (TOKENIZE, NET, LABEL_STEP)


# ---- the export ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportBundle:
    """A training export unpacked into a directory (model.pt, model_config.json, labels.json, tokenizer/)."""

    root: Path
    config: dict[str, Any]
    labels: tuple[str, ...]

    @classmethod
    def load(cls, root: Path) -> ExportBundle:
        """Read and check the export; FailedPrecondition names what is missing or inconsistent. Everything it names
        must be inside ``root`` and no link (model.py, running in Triton, checks the same again)."""
        for name, is_dir in ((MODEL_FILE, False), (CONFIG_FILE, False), (LABELS_FILE, False), (TOKENIZER_DIR, True)):
            path = _inside(root, name)
            if not (path.is_dir() if is_dir else path.is_file()):
                raise _unusable(f"{name} is missing")
        for member in (root / TOKENIZER_DIR).iterdir():
            _inside(root, f"{TOKENIZER_DIR}/{member.name}")
        config = _read_json(root, CONFIG_FILE, dict)
        labels = tuple(_read_json(root, LABELS_FILE, list))
        bundle = cls(root, config, labels)
        bundle._check()
        return bundle

    def _check(self) -> None:
        config, labels = self.config, self.labels
        expected = {"format": "torchscript", "task": "sequence-classification"}
        for key, value in expected.items():
            if config.get(key) != value:
                raise _unusable(f"{CONFIG_FILE} {key} is {config.get(key)!r}, not {value!r}")
        if len(labels) < 2 or not all(isinstance(label, str) and label for label in labels):
            raise _unusable(f"{LABELS_FILE} must list at least 2 class names, got {list(labels)}")
        if len(set(labels)) != len(labels):
            raise _unusable(f"{LABELS_FILE} repeats a class name: {list(labels)}")
        if config.get("labels") != list(labels) or config.get("num_labels") != len(labels):
            raise _unusable(
                f"{LABELS_FILE} {list(labels)} disagrees with {CONFIG_FILE} labels {config.get('labels')} "
                f"(num_labels {config.get('num_labels')})",
            )
        if config.get("file", MODEL_FILE) != MODEL_FILE:
            raise _unusable(
                f"{CONFIG_FILE} file must be {MODEL_FILE!r} (the export's own model), not {config['file']!r}"
            )
        if not _positive_int(config.get("max_sequence_length")):
            raise _unusable(f"{CONFIG_FILE} max_sequence_length must be a positive integer")
        tokenizer = config.get("tokenizer")
        if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("pad_token_id"), int):
            raise _unusable(f"{CONFIG_FILE} tokenizer.pad_token_id is missing")
        if (
            tokenizer.get("dir", TOKENIZER_DIR) != TOKENIZER_DIR
            or not _inside(self.root, f"{TOKENIZER_DIR}/tokenizer.json").is_file()
        ):
            raise _unusable(f"{TOKENIZER_DIR}/tokenizer.json (a fast tokenizer) is missing")
        self.libtorch_names()

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def libtorch_names(self) -> tuple[str, str, str]:
        """pytorch_libtorch's names of (input_ids, attention_mask, logits): INPUT__0, INPUT__1, OUTPUT__0."""
        tensors = [*self.config.get("inputs", ()), *self.config.get("outputs", ())]
        by_name = {t.get("name"): t.get("libtorch_name") for t in tensors if isinstance(t, dict)}
        ids, mask, logits = (by_name.get(name) for name in ("input_ids", "attention_mask", "logits"))
        if not (isinstance(ids, str) and isinstance(mask, str) and isinstance(logits, str)):
            raise _unusable(f"{CONFIG_FILE} lacks libtorch_name of input_ids, attention_mask or logits")
        return ids, mask, logits


def _unusable(problem: str) -> FailedPrecondition:
    return FailedPrecondition(f"the export cannot be served: {problem}")


def _inside(root: Path, relative: str) -> Path:
    """``root/relative``, refused unless it stays inside ``root``: no absolute path, no '..', no link on the way."""
    parts = Path(relative).parts
    if Path(relative).is_absolute() or ".." in parts:
        raise _unusable(f"{relative!r} is not a path inside the export")
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise _unusable(f"{relative!r} is a link")
    if not path.resolve().is_relative_to(root.resolve()):
        raise _unusable(f"{relative!r} leads outside the export")
    return path


def _read_json(root: Path, name: str, kind: type) -> Any:
    try:
        value = json.loads(_inside(root, name).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _unusable(f"{name} is not JSON ({exc})") from exc
    if not isinstance(value, kind):
        raise _unusable(f"{name} must hold a JSON {'object' if kind is dict else 'array'}")
    return value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# ---- deployment shape and config text --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentShape:
    """How a deployment runs: model instances per loaded version, and Triton's dynamic batcher."""

    instance_count: int = 1
    #: Most rows in one model execution; 0 disables dynamic batching (tensors' dims then carry the row dimension).
    max_batch_size: int = 8
    #: How long the batcher may hold a request for others to join it. 0 (Triton's default) adds no latency: batches
    #: then form only from requests that queued while every instance was busy.
    max_queue_delay_microseconds: int = 0

    def __post_init__(self) -> None:
        if not _positive_int(self.instance_count):
            raise InvalidArgument(f"instance_count must be at least 1, not {self.instance_count}")
        for name in ("max_batch_size", "max_queue_delay_microseconds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgument(f"{name} must be an integer >= 0, not {value!r}")

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    def dims(self, *row: int) -> list[int]:
        """A tensor's dims as config.pbtxt states them: per row when batching, else with the row dimension (-1)."""
        return list(row) if self.batching else [-1, *row]


@dataclass(frozen=True)
class _Configs:
    """The config of each Triton model of one deployment (both flavours' models; each flavour uses its own)."""

    name: str
    versions: tuple[int, ...]
    shape: DeploymentShape
    bundle: ExportBundle
    #: LOGITS width: the export's label count, or -1 when versions served side by side disagree on it.
    logits_dim: int
    python_env: str

    def classifier(self) -> mc.ModelConfig:
        """The python flavour's one model. Every input is optional: a request sends TEXT or INPUT_IDS."""
        inputs = [
            self._input(TEXT, mc.TYPE_STRING, 1),
            self._input(INPUT_IDS, mc.TYPE_INT64, -1),
            self._input(ATTENTION_MASK, mc.TYPE_INT64, -1),
        ]
        outputs = [self._output(LOGITS, mc.TYPE_FP32, self.logits_dim), self._output(LABEL, mc.TYPE_STRING, 1)]
        return self._labelled(self._python(self.name, "classify", inputs, outputs))

    def tokenize(self) -> mc.ModelConfig:
        return self._python(
            self.name + TOKENIZE,
            "tokenize",
            [self._input(TEXT, mc.TYPE_STRING, 1, optional=False)],
            [self._output(INPUT_IDS, mc.TYPE_INT64, -1), self._output(ATTENTION_MASK, mc.TYPE_INT64, -1)],
        )

    def label(self) -> mc.ModelConfig:
        return self._python(
            self.name + LABEL_STEP,
            "label",
            [self._input(LOGITS, mc.TYPE_FP32, self.logits_dim, optional=False)],
            [self._output(LABEL, mc.TYPE_STRING, 1)],
        )

    def net(self) -> mc.ModelConfig:
        """model.pt on pytorch_libtorch. The tokenize step pads to max_sequence_length, so all requests have one
        shape and the dynamic batcher can put any of them together without ragged batching (libtorch has none)."""
        ids, mask, logits = self.bundle.libtorch_names()
        config = self._scheduled(self.name + NET, mc.ModelInstanceGroup.KIND_GPU)
        config.platform = "pytorch_libtorch"
        for name in (ids, mask):
            config.input.append(mc.ModelInput(name=name, data_type=mc.TYPE_INT64, dims=self.shape.dims(-1)))
        config.output.append(self._output(logits, mc.TYPE_FP32, self.logits_dim))
        config.parameters["INFERENCE_MODE"].string_value = "true"
        return config

    def ensemble(self) -> mc.ModelConfig:
        """The libtorch flavour's face: TEXT in, LOGITS and LABEL out, like the python flavour.

        Triton has one ensemble config for all of its versions, so every served version runs the newest listed
        version of the steps (pinned, never "latest loaded": a step version loaded by someone else is not used).
        """
        ids, mask, logits = self.bundle.libtorch_names()
        step_version = max(self.versions)
        config = mc.ModelConfig(
            name=self.name,
            platform="ensemble",
            max_batch_size=self.shape.max_batch_size,
            version_policy=self._version_policy(),
            input=[self._input(TEXT, mc.TYPE_STRING, 1, optional=False)],
            output=[self._output(LOGITS, mc.TYPE_FP32, self.logits_dim), self._output(LABEL, mc.TYPE_STRING, 1)],
        )
        steps = (
            (TOKENIZE, {TEXT: TEXT}, {INPUT_IDS: "input_ids", ATTENTION_MASK: "attention_mask"}),
            (NET, {ids: "input_ids", mask: "attention_mask"}, {logits: LOGITS}),
            (LABEL_STEP, {LOGITS: LOGITS}, {LABEL: LABEL}),
        )
        for suffix, inputs, outputs in steps:
            config.ensemble_scheduling.step.append(
                mc.ModelEnsembling.Step(
                    model_name=self.name + suffix, model_version=step_version, input_map=inputs, output_map=outputs
                )
            )
        return self._labelled(config)

    def _labelled(self, config: mc.ModelConfig) -> mc.ModelConfig:
        """Parameter ``labels``: the class names in LOGITS order (JSON list, of the newest version), so a client in
        any language learns them from ModelConfig."""
        config.parameters[LABELS_PARAMETER].string_value = json.dumps(list(self.bundle.labels))
        return config

    def _python(
        self, name: str, step: str, inputs: list[mc.ModelInput], outputs: list[mc.ModelOutput]
    ) -> mc.ModelConfig:
        """A python-backend model running text_classifier/model.py as one of its steps (parameter AIDC_STEP)."""
        config = self._scheduled(name, mc.ModelInstanceGroup.KIND_CPU)
        config.backend = "python"
        config.input.extend(inputs)
        config.output.extend(outputs)
        config.parameters["AIDC_STEP"].string_value = step
        if self.python_env:
            config.parameters["EXECUTION_ENV_PATH"].string_value = self.python_env
        return config

    def _scheduled(self, name: str, kind: mc.ModelInstanceGroup.Kind.ValueType) -> mc.ModelConfig:
        config = mc.ModelConfig(
            name=name,
            max_batch_size=self.shape.max_batch_size,
            version_policy=self._version_policy(),
            instance_group=[mc.ModelInstanceGroup(count=self.shape.instance_count, kind=kind)],
        )
        if self.shape.batching:
            # The message's presence, even empty, is what turns Triton's dynamic batcher on.
            config.dynamic_batching.SetInParent()
            config.dynamic_batching.max_queue_delay_microseconds = self.shape.max_queue_delay_microseconds
        return config

    def _version_policy(self) -> mc.ModelVersionPolicy:
        return mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=self.versions))

    def _input(self, name: str, dtype: int, width: int, optional: bool = True) -> mc.ModelInput:
        """An input of a python model or the ensemble. Variable-length ones allow ragged batches, so requests of
        different lengths share a batch: the python model receives each request's own tensors and pads them."""
        return mc.ModelInput(
            name=name,
            data_type=dtype,
            dims=self.shape.dims(width),
            optional=optional,
            allow_ragged_batch=self.shape.batching and width == -1,
        )

    def _output(self, name: str, dtype: int, width: int) -> mc.ModelOutput:
        return mc.ModelOutput(name=name, data_type=dtype, dims=self.shape.dims(width))


# ---- the live repository ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """One Triton model of a deployment: its name suffix, what a version directory holds, how it is configured."""

    suffix: str
    files: tuple[str, ...]
    config: Callable[[_Configs], mc.ModelConfig]


#: Each flavour's models; the deployment's own model (the ensemble for libtorch) last, so that its version directory
#: appears only once the others' are complete.
_FLAVOUR_PARTS: dict[str, tuple[_Part, ...]] = {
    "python": (_Part("", (MODEL_PY, MODEL_FILE, TOKENIZER_DIR, LABELS_FILE, CONFIG_FILE), _Configs.classifier),),
    "libtorch": (
        _Part(TOKENIZE, (MODEL_PY, TOKENIZER_DIR, CONFIG_FILE), _Configs.tokenize),
        _Part(NET, (MODEL_FILE,), _Configs.net),
        _Part(LABEL_STEP, (MODEL_PY, LABELS_FILE, CONFIG_FILE), _Configs.label),
        _Part("", (), _Configs.ensemble),
    ),
}
#: Removal order of a deployment's models, whichever flavour wrote them: the deployment's own model first.
_REMOVAL_ORDER = ("", *_PART_SUFFIXES)


class LiveRepository:
    """Triton's model repository directory, written for one flavour; a deployment is addressed by its Triton name.

    With a ``mirror`` (Triton reads its repository from S3) the directory is the staging area: each change of a
    deployment is made here, then mirrored to S3, whose objects Triton reads. A deployment whose mirroring failed
    (or that this process has not mirrored yet) is mirrored again before ``versions`` answers for it, so a reload
    that finds the version written does not find it missing in S3.

    Not safe for concurrent writers of the same deployment (the deployments core serialises each deployment's
    rollouts); different deployments may be written concurrently.
    """

    def __init__(
        self,
        root: Path,
        flavour: str = "python",
        python_env: str = "",
        *,
        mirror: S3RepositoryMirror | None = None,
    ) -> None:
        if flavour not in FLAVOURS:
            raise InvalidArgument(f"flavour must be one of {', '.join(FLAVOURS)}, not {flavour!r}")
        self.root = root
        self.flavour = flavour
        self.python_env = python_env
        self.mirror = mirror
        self._parts = _FLAVOUR_PARTS[flavour]
        private_dir(root)
        #: Deployments whose S3 objects may differ from the directory.
        self._unmirrored: set[str] = set(self.names()) if mirror is not None else set()

    def write_version(self, triton_name: str, version: int, bundle: ExportBundle) -> None:
        """Write the version's files of every model of the deployment; rewriting an existing version is fine.

        Each version directory is staged under a hidden name in the root and renamed into place, so Triton never
        sees part of one. The ensemble's (empty) version directory comes last: versions() lists complete ones.
        A rewrite swaps the directory with two renames: do not load that version while it is being rewritten.
        """
        _check_version(version)
        with self._changing(triton_name, [part.suffix for part in self._parts]):
            for part in self._parts:
                files = {name: TEXT_CLASSIFIER_MODEL if name == MODEL_PY else bundle.root / name for name in part.files}
                self._publish_version(self._model_dir(triton_name + part.suffix), version, files)

    def write_config(
        self, triton_name: str, versions: Sequence[int], shape: DeploymentShape, bundle: ExportBundle
    ) -> None:
        """Replace the config.pbtxt of every model of the deployment so that exactly these versions load.

        The versions must have been written. bundle is the newest export: its label count sets LOGITS' width,
        which becomes -1 (any) if a listed version has a different count.
        """
        chosen = tuple(sorted(set(versions)))
        if not chosen:
            raise InvalidArgument(f"{triton_name}: a config needs at least one version")
        for version in chosen:
            _check_version(version)
            for part in self._parts:
                if not (self._model_dir(triton_name + part.suffix) / str(version)).is_dir():
                    raise FailedPrecondition(f"version {version} of {triton_name} is not written")
        counts = {len(self._written_labels(triton_name, version)) for version in chosen}
        configs = _Configs(
            name=triton_name,
            versions=chosen,
            shape=shape,
            bundle=bundle,
            logits_dim=bundle.num_labels if counts == {bundle.num_labels} else -1,
            python_env=self.python_env,
        )
        with self._changing(triton_name, [part.suffix for part in self._parts]):
            for part in self._parts:
                text = text_format.MessageToString(part.config(configs))
                _replace_file(self._model_dir(triton_name + part.suffix) / CONFIG_PBTXT, text)

    def load_order(self, triton_name: str) -> list[str]:
        """Triton models to load, in this order, to serve the deployment: just the deployment's own model.

        For libtorch that is the ensemble: Triton 2.51 loads its composing models with it and, on a later load,
        reloads those whose config or versions changed, all in the one load call (measured: faster than loading
        the parts first, and the rollout succeeds or fails as a whole). Unloading the ensemble leaves the parts
        loaded: unload with unload_dependents=True (harmless for the python flavour).
        """
        return [triton_name]

    def remove_version(self, triton_name: str, version: int) -> None:
        """Delete the version's directory from every model of the deployment (any flavour), ensemble first."""
        with self._changing(triton_name, _REMOVAL_ORDER):
            for suffix in _REMOVAL_ORDER:
                _discard(self._model_dir(triton_name + suffix) / str(version), self.root)

    def remove(self, triton_name: str) -> None:
        """Delete every directory of the deployment, whichever flavour wrote it (unload it from Triton first)."""
        with self._changing(triton_name, _REMOVAL_ORDER):
            for suffix in _REMOVAL_ORDER:
                _discard(self._model_dir(triton_name + suffix), self.root)

    def versions(self, triton_name: str) -> list[int]:
        """Versions written (complete) for the deployment, ascending; with a mirror, mirrored to S3 too."""
        model_dir = self._model_dir(triton_name)
        if triton_name in self._unmirrored:
            # The order of a write: what may have changed is not known.
            self._mirror_now(triton_name, (*_PART_SUFFIXES, ""))
        if not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())

    def holds(self, triton_name: str, version: int, export_files: Mapping[str, str]) -> bool:
        """Whether the version is written (versions()) with exactly the files of the export whose files' SHA-256s
        are ``export_files`` (pins.export_files), in every model of the deployment: what a reload may load as it
        is. False when a file is missing, added or changed."""
        if version not in self.versions(triton_name):
            return False
        model_py = sha256_file(TEXT_CLASSIFIER_MODEL)
        for part in self._parts:
            expected: dict[str, str] = {}
            for name in part.files:
                if name == MODEL_PY:
                    expected[name] = model_py
                expected.update(
                    (path, digest)
                    for path, digest in export_files.items()
                    if path == name or path.startswith(f"{name}/")
                )
            version_dir = self._model_dir(triton_name + part.suffix) / str(version)
            try:
                if export_files_of(version_dir) != expected:
                    return False
            except FailedPrecondition:
                return False
        return True

    def names(self) -> list[str]:
        """Triton names of the deployments present (composing models and staging directories left out)."""
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(_PART_SUFFIXES)
        )

    @contextmanager
    def _changing(self, triton_name: str, suffixes: Sequence[str]) -> Iterator[None]:
        """Wraps a change of the deployment's directories. With a mirror: marks the deployment unmirrored, then
        mirrors its models with these suffixes, in this order (it stays marked if the change or the mirroring
        fails)."""
        if self.mirror is None:
            yield
            return
        self._model_dir(triton_name)
        self._unmirrored.add(triton_name)
        yield
        self._mirror_now(triton_name, suffixes)

    def _mirror_now(self, triton_name: str, suffixes: Sequence[str]) -> None:
        assert self.mirror is not None
        for suffix in suffixes:
            self.mirror.sync(self.root, triton_name + suffix)
        self._unmirrored.discard(triton_name)

    def _model_dir(self, name: str) -> Path:
        if not name or name.startswith(".") or "/" in name or os.sep in name:
            raise InvalidArgument(f"{name!r} is not a Triton model name")
        return self.root / name

    def _written_labels(self, triton_name: str, version: int) -> list[Any]:
        holder = next(part for part in self._parts if LABELS_FILE in part.files)
        path = self._model_dir(triton_name + holder.suffix) / str(version) / LABELS_FILE
        labels = json.loads(path.read_text())
        return labels if isinstance(labels, list) else []

    def _publish_version(self, model_dir: Path, version: int, files: dict[str, Path]) -> None:
        model_dir.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        staging = _fresh_hidden_path(self.root, f"staging-{model_dir.name}-{version}")
        staging.mkdir(mode=PRIVATE_DIR_MODE)
        try:
            for name, source in files.items():
                if source.is_dir():
                    # Private like everything of the platform's: Triton reads it as the platform's user (here) or
                    # from S3 (on a cluster).
                    shutil.copytree(source, staging / name, copy_function=shutil.copyfile)
                else:
                    shutil.copyfile(source, staging / name)
            _discard(model_dir / str(version), self.root)
            staging.rename(model_dir / str(version))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _check_version(version: int) -> None:
    if not _positive_int(version):
        raise InvalidArgument(f"a Triton model version is a positive integer, not {version!r}")


def _fresh_hidden_path(root: Path, label: str) -> Path:
    """A new name under root that Triton never loads (hidden) and that no other writer picks."""
    return root / f".{label}-{uuid.uuid4().hex}"


def _discard(path: Path, root: Path) -> None:
    """Remove a directory at once for Triton: renamed away first, then deleted at leisure."""
    if not path.exists():
        return
    doomed = _fresh_hidden_path(root, "removed")
    path.rename(doomed)
    shutil.rmtree(doomed)


def _replace_file(path: Path, text: str) -> None:
    staging = _fresh_hidden_path(path.parent, path.name)
    try:
        staging.write_text(text)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


# ---- the rollout probe -----------------------------------------------------------------------------------------


def probe_request(bundle: ExportBundle) -> tuple[list[triton_grpc.InferInput], list[str]]:
    """One short real text (naming the export's classes) and the outputs to ask for: what the deployer sends a
    freshly loaded version before routing traffic to it."""
    text = triton_grpc.InferInput(TEXT, [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[f"deployment probe: {', '.join(bundle.labels)}".encode()]], dtype=np.object_))
    return [text], [LOGITS, LABEL]


def check_probe_result(bundle: ExportBundle, result: triton_grpc.InferResult) -> None:
    """FailedPrecondition unless the probe's answer has finite logits for each class and a label that is their
    argmax among the export's classes."""
    logits, label = result.as_numpy(LOGITS), result.as_numpy(LABEL)
    if logits is None or label is None:
        raise FailedPrecondition(f"the probe's answer lacks {LOGITS if logits is None else LABEL}")
    if logits.shape != (1, bundle.num_labels):
        raise FailedPrecondition(f"the probe's {LOGITS} have shape {list(logits.shape)}, not [1, {bundle.num_labels}]")
    if not np.isfinite(logits).all():
        raise FailedPrecondition(f"the probe's {LOGITS} are not finite: {logits.tolist()}")
    if label.shape != (1, 1):
        raise FailedPrecondition(f"the probe's {LABEL} has shape {list(label.shape)}, not [1, 1]")
    name = label[0, 0].decode() if isinstance(label[0, 0], bytes) else str(label[0, 0])
    if name not in bundle.labels:
        raise FailedPrecondition(f"the probe's {LABEL} {name!r} is not a class of the export: {list(bundle.labels)}")
    expected = bundle.labels[int(logits.argmax())]
    if name != expected:
        raise FailedPrecondition(
            f"the probe's {LABEL} {name!r} is not the class of its {LOGITS}' argmax ({expected!r})"
        )
