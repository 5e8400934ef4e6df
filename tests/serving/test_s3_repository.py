"""The live model repository on S3: LiveRepository stages each change locally and S3RepositoryMirror mirrors it into
a real S3 server (SeaweedFS, the `seaweed` fixture from tests/storage via tests/serving/conftest.py), from which a
real Triton, started the way `aidc up` starts it (platform spec: s3mirror wrapper, AWS_* env), loads and serves.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as triton_grpc
from minio import Minio

from services.mesh.config import MeshSettings, load_settings
from services.mesh.errors import InvalidArgument, Unavailable
from services.platform.components import S3Credentials, build_components, resolve_platform
from services.platform.config import PlatformSettings
from services.serving.config import ServingSettings
from services.serving.repository import (
    DeploymentShape,
    ExportBundle,
    LiveRepository,
    check_probe_result,
    probe_request,
)
from services.serving.s3mirror import S3RepositoryMirror, S3RepositoryURL
from tests.conftest import free_port
from tests.serving.sample_support import OBVIOUS_TEXTS, SAMPLE_DIR, copy_sample, text_input
from tests.serving.triton import TritonProcess
from tests.storage.seaweed import SeaweedFS

SERVED = "acme__sample"
TEXTS = [text for text, _ in OBVIOUS_TEXTS]
EXPECTED = [label for _, label in OBVIOUS_TEXTS]
#: Version 2's export: the sample with its classes renamed, so that an answer shows which version gave it.
RENAMED = {"negative": "unhappy", "neutral": "indifferent", "positive": "happy"}


# ---- helpers ---------------------------------------------------------------------------------------------------


def _bucket() -> str:
    return f"models-{secrets.token_hex(5)}"


def _url(s3: SeaweedFS, bucket: str, prefix: str = "repository") -> str:
    return f"s3://{s3.endpoint}/{bucket}/{prefix}" if prefix else f"s3://{s3.endpoint}/{bucket}"


def _mirror(s3: SeaweedFS, url: str) -> S3RepositoryMirror:
    return S3RepositoryMirror.from_env(url, s3.env())


def _objects(mirror: S3RepositoryMirror, under: str = "") -> dict[str, Any]:
    """Every object under the repository prefix + ``under`` (recursive), by key relative to the repository."""
    url = mirror.url
    prefix = url.key(under)
    start = len(url.key(""))
    return {
        item.object_name[start:]: item
        for item in mirror.client.list_objects(url.bucket, prefix=prefix, recursive=True)
        if item.object_name
    }


def _sha256_metadata(client: Minio, bucket: str, key: str) -> str | None:
    value = (client.stat_object(bucket, key).metadata or {}).get("x-amz-meta-sha256")
    return value if isinstance(value, str) else None


def _local_files(directory: Path) -> dict[str, Path]:
    return {p.relative_to(directory).as_posix(): p for p in directory.rglob("*") if p.is_file()}


class _Calls:
    """Records the mirror's writing S3 calls in order (the SDK client's own methods, wrapped)."""

    def __init__(self, mirror: S3RepositoryMirror, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple[str, str]] = []
        client = mirror.client
        # fput_object uploads through put_object: each upload is recorded once.
        for method, kind in (("put_object", "put"), ("remove_object", "delete")):
            monkeypatch.setattr(client, method, self._recording(kind, getattr(client, method)))

    def _recording(self, kind: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(bucket: str, key: str, *args: Any, **kwargs: Any) -> Any:
            self.log.append((kind, key))
            return call(bucket, key, *args, **kwargs)

        return recorded

    def keys(self, kind: str) -> list[str]:
        return [key for done, key in self.log if done == kind]

    def clear(self) -> None:
        self.log.clear()


class S3TritonProcess(TritonProcess):
    """TritonProcess on an S3 repository: the spec `aidc up` builds for AIDC_MODEL_REPOSITORY=s3://... (the
    s3mirror wrapper creating the repository, then tritonserver; AWS_* from the platform's S3 identity)."""

    def __init__(self, url: str, s3: SeaweedFS, work_dir: Path) -> None:
        super().__init__(work_dir / "unused-local-repository", work_dir)
        environ = {
            "AIDC_DATA_DIR": str(work_dir),
            "AIDC_RUNTIME_DIR": str(Path(__file__).resolve().parents[2] / ".runtime"),
            "AIDC_PLATFORM_COMPONENTS": "triton",
            "AIDC_MODEL_REPOSITORY": url,
            "AIDC_TRITON_GRPC_ADDR": self.grpc_addr,
            "AIDC_COLLECTOR_ADDR": f"127.0.0.1:{free_port()}",
            "AIDC_STOP_GRACE_SECONDS": "6",
            "AIDC_STARTUP_TIMEOUT_SECONDS": "30",
        }
        self.platform = resolve_platform(
            load_settings(MeshSettings, environ),
            load_settings(PlatformSettings, environ),
            S3Credentials(s3.access_key, s3.secret_key),
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AIDC_", "OTEL_", "AWS_"))}
        (spec,) = build_components(self.platform, base)
        self.argv = list(spec.argv)
        self.env = dict(spec.env)
        self.cwd = spec.cwd


# ---- the URL and the settings (no servers) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "endpoint", "secure", "bucket", "prefix"),
    [
        ("s3://minio.aidc.svc:9000/aidc-models/repository", "minio.aidc.svc:9000", False, "aidc-models", "repository"),
        ("s3://127.0.0.1:8333/models/a/b/", "127.0.0.1:8333", False, "models", "a/b"),
        ("s3://https://s3.example.com:443/models/repo", "s3.example.com:443", True, "models", "repo"),
        ("s3://http://minio:9000/models", "minio:9000", False, "models", ""),
    ],
)
def test_url_parsing(url: str, endpoint: str, secure: bool, bucket: str, prefix: str) -> None:
    parsed = S3RepositoryURL.parse(url)
    assert (parsed.endpoint, parsed.secure, parsed.bucket, parsed.prefix) == (endpoint, secure, bucket, prefix)
    assert parsed.key("m/config.pbtxt") == (f"{prefix}/m/config.pbtxt" if prefix else "m/config.pbtxt")
    assert S3RepositoryURL.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("/var/lib/aidc/model_repository", "does not start with s3://"),
        ("gs://bucket/repository", "does not start with s3://"),
        ("s3://aidc-models/repository", "lacks the endpoint's host:port"),
        ("s3://minio:notaport/models/repo", "lacks the endpoint's host:port"),
        ("s3://minio:9000", "lacks a bucket"),
        ("s3://minio:9000/", "lacks a bucket"),
        ("s3://ftp://minio:9000/models/repo", "unknown endpoint scheme 'ftp'"),
        ("s3://mi_nio:9000/models/repo", "bad host 'mi_nio'"),
        ("s3://minio:9000/Models/repo", "bad bucket name 'Models'"),
        ("s3://minio:9000/ab/repo", "bad bucket name 'ab'"),
        ("s3://minio:9000/models/a//b", "the prefix 'a//b' has an empty, '.' or '..' segment"),
        ("s3://minio:9000/models/a/../b", "the prefix 'a/../b' has an empty, '.' or '..' segment"),
    ],
)
def test_bad_urls_are_invalid_arguments(url: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        S3RepositoryURL.parse(url)
    message = caught.value.message
    assert message.startswith(f"{url!r} is not an S3 model repository URL: ") and problem in message, message
    assert "expected s3://host:port/bucket/prefix" in message


def test_mirror_rejects_model_names_outside_its_prefix(tmp_path: Path) -> None:
    mirror = S3RepositoryMirror("s3://127.0.0.1:1/models/repo", "ak", "sk")
    for name in ("", ".staging", "a/b", ".."):
        with pytest.raises(InvalidArgument, match="not a Triton model name"):
            mirror.sync(tmp_path, name)


def test_serving_settings_keep_an_s3_url(tmp_path: Path) -> None:
    url = "s3://minio.aidc.svc:9000/aidc-models/repository"
    settings = ServingSettings.from_env({"AIDC_DATA_DIR": str(tmp_path), "AIDC_MODEL_REPOSITORY": url})
    assert settings.model_repository_s3 == url
    assert settings.model_repository_path == tmp_path / "serving" / "model_repository"
    local = ServingSettings.from_env({"AIDC_DATA_DIR": str(tmp_path), "AIDC_MODEL_REPOSITORY": str(tmp_path / "r")})
    assert (local.model_repository_s3, local.model_repository_path) == (None, tmp_path / "r")
    default = ServingSettings.from_env({"AIDC_DATA_DIR": str(tmp_path)})
    assert (default.model_repository_s3, default.model_repository_path) == (None, tmp_path / "model_repository")
    with pytest.raises(ValueError, match="AIDC_MODEL_REPOSITORY: .*lacks the endpoint's host:port"):
        ServingSettings.from_env({"AIDC_MODEL_REPOSITORY": "s3://aidc-models/repository"})


def test_platform_passes_an_s3_url_to_triton_and_services(tmp_path: Path) -> None:
    url = "s3://127.0.0.1:50070/aidc-models/repository"
    environ = {"AIDC_DATA_DIR": str(tmp_path / "data"), "AIDC_RUNTIME_DIR": str(tmp_path / "rt")}
    platform = resolve_platform(
        load_settings(MeshSettings, environ),
        load_settings(PlatformSettings, {**environ, "AIDC_MODEL_REPOSITORY": url}),
        S3Credentials("AKIDTEST", "secret-test"),
    )
    assert platform.platform.model_repository == url
    assert platform.model_repository == tmp_path / "data" / "serving" / "model_repository"
    specs = {spec.name: spec for spec in build_components(platform, {"PATH": "/usr/bin"})}
    triton = specs["triton"]
    wrapper, tritonserver = triton.argv[: triton.argv.index("--")], triton.argv[triton.argv.index("--") + 1 :]
    assert wrapper[1:3] == ("-m", "services.serving.s3mirror") and wrapper[-1] == url
    assert tritonserver[0].endswith("/tritonserver/bin/tritonserver")
    assert f"--model-repository={url}" in tritonserver
    assert (triton.env["AWS_ACCESS_KEY_ID"], triton.env["AWS_SECRET_ACCESS_KEY"]) == ("AKIDTEST", "secret-test")
    assert specs["serving"].env["AIDC_MODEL_REPOSITORY"] == url
    assert ServingSettings.from_env(specs["serving"].env).model_repository_s3 == url


# ---- the mirror on a real S3 server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> ExportBundle:
    return ExportBundle.load(SAMPLE_DIR)


def test_sync_uploads_changes_only_config_last_deletions_after(
    seaweed: SeaweedFS, tmp_path: Path, sample: ExportBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = _bucket()
    mirror = _mirror(seaweed, _url(seaweed, bucket, "deep/repository"))
    live = LiveRepository(tmp_path / "staging", mirror=mirror)
    calls = _Calls(mirror, monkeypatch)

    live.write_version(SERVED, 1, sample)
    live.write_config(SERVED, [1], DeploymentShape(), sample)
    # The bucket did not exist: the mirror created it, and the prefix Triton needs to start.
    assert mirror.client.bucket_exists(bucket)
    objects = _objects(mirror)
    local = _local_files(live.root)
    assert set(objects) == {".keep", *local}
    for relative, path in local.items():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert _sha256_metadata(mirror.client, bucket, mirror.url.key(relative)) == digest, relative

    calls.clear()
    before = {key: item.last_modified for key, item in _objects(mirror).items()}
    mirror.sync(live.root, SERVED)
    live.write_config(SERVED, [1], DeploymentShape(), sample)  # the same text again
    assert calls.log == []
    assert {key: item.last_modified for key, item in _objects(mirror).items()} == before

    # v2 and a config listing both: version files first, config.pbtxt after them; nothing deleted.
    calls.clear()
    live.write_version(SERVED, 2, sample)
    live.write_config(SERVED, [1, 2], DeploymentShape(), sample)
    puts = calls.keys("put")
    assert puts[-1] == mirror.url.key(f"{SERVED}/config.pbtxt")
    version_2 = {k for k in _local_files(live.root) if k.startswith(f"{SERVED}/2/")}
    assert sorted(puts[:-1]) == sorted(mirror.url.key(k) for k in version_2)
    assert calls.keys("delete") == []

    # One changed file is the only upload.
    calls.clear()
    (live.root / SERVED / "2" / "labels.json").write_text(json.dumps(list(sample.labels)) + "\n")
    mirror.sync(live.root, SERVED)
    assert calls.log == [("put", mirror.url.key(f"{SERVED}/2/labels.json"))]

    # Dropping v1: the new config is up before any of v1's files goes.
    calls.clear()
    live.write_config(SERVED, [2], DeploymentShape(), sample)
    live.remove_version(SERVED, 1)
    assert calls.log[0] == ("put", mirror.url.key(f"{SERVED}/config.pbtxt"))
    assert {kind for kind, _ in calls.log[1:]} == {"delete"}
    assert not [key for key in _objects(mirror) if key.startswith(f"{SERVED}/1/")]
    assert set(_objects(mirror)) == {".keep", *_local_files(live.root)}

    # The whole deployment gone: config.pbtxt first, then every other object under it.
    calls.clear()
    live.remove(SERVED)
    assert calls.log[0] == ("delete", mirror.url.key(f"{SERVED}/config.pbtxt"))
    assert _objects(mirror, f"{SERVED}/") == {}
    assert set(_objects(mirror)) == {".keep"}


def test_libtorch_layout_keeps_empty_version_directories(
    seaweed: SeaweedFS, tmp_path: Path, sample: ExportBundle
) -> None:
    """The ensemble's version directories hold no file, and S3 keeps no empty directory: each becomes a directory
    marker object ("<model>/<version>/"), which Triton lists as the version directory."""
    mirror = _mirror(seaweed, _url(seaweed, _bucket(), prefix=""))
    live = LiveRepository(tmp_path / "staging", "libtorch", mirror=mirror)
    live.write_version("acme__m", 1, sample)
    live.write_config("acme__m", [1], DeploymentShape(), sample)
    objects = set(_objects(mirror))
    assert {
        "acme__m/1/",
        "acme__m/config.pbtxt",
        "acme__m__net/1/model.pt",
        "acme__m__label/1/labels.json",
    } <= objects
    assert objects == set(_local_files(live.root)) | {"acme__m/1/"}
    assert ".keep" not in objects  # the bucket's root is the repository: it exists with the bucket
    live.write_version("acme__m", 2, sample)
    live.write_config("acme__m", [2], DeploymentShape(), sample)
    live.remove_version("acme__m", 1)
    assert not [key for key in _objects(mirror) if "/1/" in key]
    assert "acme__m/2/" in _objects(mirror)
    live.remove("acme__m")
    assert _objects(mirror) == {}


def test_a_failed_sync_is_retried_before_versions_answers(tmp_path: Path, sample: ExportBundle) -> None:
    """The outage is real: a private SeaweedFS (not the session's, which other tests share) is stopped while a
    version is written, and started again on the same directory and ports."""
    s3 = SeaweedFS(tmp_path / "s3")
    s3.start()
    try:
        _retried_after_an_outage(s3, tmp_path, sample)
    finally:
        s3.stop()


def _retried_after_an_outage(s3: SeaweedFS, tmp_path: Path, sample: ExportBundle) -> None:
    mirror = _mirror(s3, _url(s3, _bucket()))
    live = LiveRepository(tmp_path / "staging", mirror=mirror)
    s3.stop()
    with pytest.raises(Unavailable, match="object store at 127.0.0.1:"):
        live.write_version(SERVED, 1, sample)
    assert (live.root / SERVED / "1").is_dir()  # written locally, not in S3
    s3.start()
    assert not mirror.client.bucket_exists(mirror.url.bucket)
    assert live.versions(SERVED) == [1]
    assert set(_objects(mirror, f"{SERVED}/")) == {f"{SERVED}/{k}" for k in _local_files(live.root / SERVED)}

    # A new process over the same staging directory mirrors what it finds before answering for it.
    restarted = LiveRepository(live.root, mirror=_mirror(s3, str(mirror.url)))
    mirror.client.remove_object(mirror.url.bucket, mirror.url.key(f"{SERVED}/1/model.pt"))
    assert restarted.versions(SERVED) == [1]
    assert f"{SERVED}/1/model.pt" in _objects(mirror)


def test_store_failures_are_unavailable(seaweed: SeaweedFS, tmp_path: Path, sample: ExportBundle) -> None:
    live_dir = tmp_path / "staging"
    LiveRepository(live_dir).write_version(SERVED, 1, sample)
    nobody = S3RepositoryMirror(f"s3://127.0.0.1:{free_port()}/models/repo", "ak", "sk", timeout_seconds=2)
    with pytest.raises(Unavailable, match="unreachable"):
        nobody.sync(live_dir, SERVED)
    stranger = S3RepositoryMirror(_url(seaweed, _bucket()), seaweed.access_key, "not-the-secret")
    with pytest.raises(Unavailable, match="credentials"):
        stranger.sync(live_dir, SERVED)


def test_triton_wrapper_gives_up_on_an_unreachable_store() -> None:
    url = f"s3://127.0.0.1:{free_port()}/models/repo"
    done = subprocess.run(
        [sys.executable, "-m", "services.serving.s3mirror", "--wait=1", url, "--", "true"],
        env={**os.environ, "AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "sk"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"cannot create the model repository {url} after 1s: object store at" in done.stderr


# ---- end to end: Triton reads the mirrored repository ----------------------------------------------------------


@pytest.fixture
def renamed_sample(tmp_path: Path) -> ExportBundle:
    root = copy_sample(tmp_path / "renamed")
    labels = [RENAMED[label] for label in json.loads((root / "labels.json").read_text())]
    (root / "labels.json").write_text(json.dumps(labels))
    config = json.loads((root / "model_config.json").read_text())
    config["labels"] = labels
    (root / "model_config.json").write_text(json.dumps(config, indent=2))
    return ExportBundle.load(root)


@pytest.fixture
def s3_triton(seaweed: SeaweedFS, tmp_path: Path) -> Iterator[S3TritonProcess]:
    """Triton on a repository whose bucket does not exist yet (the platform's wrapper creates it)."""
    process = S3TritonProcess(_url(seaweed, _bucket()), seaweed, tmp_path / "triton")
    process.start()
    yield process
    process.stop()


def _labels(client: triton_grpc.InferenceServerClient, version: int) -> list[str]:
    result = client.infer(
        SERVED, [text_input(TEXTS)], model_version=str(version), outputs=[triton_grpc.InferRequestedOutput("LABEL")]
    )
    return [value.decode() for value in result.as_numpy("LABEL").ravel()]


def _probe(client: triton_grpc.InferenceServerClient, bundle: ExportBundle, version: int) -> None:
    inputs, outputs = probe_request(bundle)
    requested = [triton_grpc.InferRequestedOutput(name) for name in outputs]
    check_probe_result(bundle, client.infer(SERVED, inputs, model_version=str(version), outputs=requested))


def test_triton_serves_the_mirrored_repository(
    seaweed: SeaweedFS,
    s3_triton: S3TritonProcess,
    tmp_path: Path,
    sample: ExportBundle,
    renamed_sample: ExportBundle,
) -> None:
    url = s3_triton.platform.model_repository_url
    assert f"--model-repository={url}" in s3_triton.argv
    mirror = _mirror(seaweed, url)
    live = LiveRepository(tmp_path / "serving" / "model_repository", mirror=mirror)
    bucket = mirror.url.bucket

    live.write_version(SERVED, 1, sample)
    live.write_config(SERVED, [1], DeploymentShape(), sample)
    model_py = mirror.url.key(f"{SERVED}/1/model.py")
    expected = hashlib.sha256((live.root / SERVED / "1" / "model.py").read_bytes()).hexdigest()
    assert _sha256_metadata(mirror.client, bucket, model_py) == expected

    with s3_triton.client() as client:
        client.load_model(SERVED)
        _probe(client, sample, 1)
        assert _labels(client, 1) == EXPECTED

        # v2 next to v1, then only v2: the answers name v2's classes.
        live.write_version(SERVED, 2, renamed_sample)
        live.write_config(SERVED, [1, 2], DeploymentShape(), renamed_sample)
        client.load_model(SERVED)
        assert client.is_model_ready(SERVED, "1") and client.is_model_ready(SERVED, "2")
        assert _labels(client, 2) == [RENAMED[label] for label in EXPECTED]
        assert _labels(client, 1) == EXPECTED
        _probe(client, renamed_sample, 2)

        live.write_config(SERVED, [2], DeploymentShape(), renamed_sample)
        client.load_model(SERVED)
        live.remove_version(SERVED, 1)
        assert not [key for key in _objects(mirror) if key.startswith(f"{SERVED}/1/")]
        assert not client.is_model_ready(SERVED, "1")
        assert _labels(client, 2) == [RENAMED[label] for label in EXPECTED]

        # A Triton restart finds the repository in S3 alone.
        s3_triton.stop()
        s3_triton.start()
        client.load_model(SERVED)
        assert _labels(client, 2) == [RENAMED[label] for label in EXPECTED]

        client.unload_model(SERVED)
        live.remove(SERVED)
    assert _objects(mirror, f"{SERVED}/") == {}
    assert set(_objects(mirror)) == {".keep"}
    # An empty repository is still one Triton can start on.
    s3_triton.stop()
    s3_triton.start()
