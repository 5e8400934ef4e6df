"""Where deployments come from: model versions in the training service's registry, their export artifacts in the
storage service. Calls go out with the deploying user's token during a Deploy RPC, and as the serving service itself
(its mTLS identity) for background work: alias following, resumed rollouts, rebuilding a lost repository.

Artifacts are fetched by (name, version) and must have exactly the SHA-256 the registry version pinned (pins.py):
bytes stored under that name and number by anyone else are refused before they are unpacked."""

from __future__ import annotations

import asyncio
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from services.gen.aidc.storage.v1 import storage_service_pb2 as storage_pb
from services.gen.aidc.training.v1 import training_service_pb2 as training_pb
from services.mesh.errors import FailedPrecondition
from services.mesh.files import PRIVATE_FILE_MODE, private_dir
from services.serving.pins import check_artifact, is_sha256, seal_export
from services.storage.client import StorageClient
from services.training.client import TrainingClient

__all__ = ["ArtifactFile", "ResolvedVersion", "RegistrySource", "EXPORT_ROLES"]

#: Artifact role -> file name in an unpacked export (tokenizer is a tar of the tokenizer directory).
EXPORT_ROLES = {
    "model": "model.pt",
    "model_config": "model_config.json",
    "labels": "labels.json",
    "tokenizer": "tokenizer.tar.gz",
}


@dataclass(frozen=True)
class ArtifactFile:
    name: str
    version: int
    sha256: str


@dataclass(frozen=True)
class ResolvedVersion:
    """A registry version and the storage artifacts a deployment is built from."""

    tenant: str
    model: str
    version: int
    artifacts: dict[str, ArtifactFile]

    @property
    def pins(self) -> dict[str, str]:
        """The registry's SHA-256 of each artifact, by role."""
        return {role: artifact.sha256 for role, artifact in self.artifacts.items()}


def _resolved(found: training_pb.ModelVersion) -> ResolvedVersion:
    artifacts = {a.role: ArtifactFile(a.name, a.version, a.sha256) for a in found.artifacts if a.role in EXPORT_ROLES}
    missing = sorted(EXPORT_ROLES.keys() - artifacts.keys())
    if missing:
        raise FailedPrecondition(
            f"version {found.version} of model {found.model!r} has no {', '.join(missing)} artifact: it cannot be "
            "served (only TorchScript exports of sequence classifiers can)"
        )
    unpinned = sorted(role for role, a in artifacts.items() if not is_sha256(a.sha256) or a.version < 1)
    if unpinned:
        raise FailedPrecondition(
            f"version {found.version} of model {found.model!r} does not pin its {', '.join(unpinned)} artifact to a "
            "version and SHA-256: it cannot be served"
        )
    return ResolvedVersion(found.tenant, found.model, found.version, artifacts)


def _unpack_tokenizer(archive: Path, target: Path) -> None:
    """Unpacks the tokenizer tar into ``target``, flattened: its regular files only, each by its own name (so no
    member can land outside ``target`` or be a link), private."""
    private_dir(target)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = PurePosixPath(member.name).name
            if not member.isfile() or not name or name.startswith("."):
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            try:
                # O_EXCL: a second member of the same name is refused rather than overwriting the first.
                fd = os.open(target / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
            except FileExistsError:
                raise FailedPrecondition(f"the tokenizer archive holds {name!r} twice") from None
            with source, os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(source, out)
    archive.unlink()


class RegistrySource:
    """Resolves versions through TrainingService and fetches their artifacts through StorageService."""

    def __init__(self, training: TrainingClient, storage: StorageClient, transfer_timeout_seconds: float = 600.0):
        self._training = training
        self._storage = storage
        self._timeout = transfer_timeout_seconds

    async def close(self) -> None:
        await self._training.close()
        await self._storage.close()

    async def resolve(self, tenant: str, model: str, version: int = 0, alias: str = "") -> ResolvedVersion:
        """The version asked for (pinned, by alias, or the latest); NOT_FOUND from the registry passes through."""
        found = await self._training.get_model_version(model, tenant=tenant, version=version, alias=alias)
        return _resolved(found)

    async def fetch(self, resolved: ResolvedVersion, target: Path) -> None:
        """Downloads the export into ``target`` (model.pt, model_config.json, labels.json, tokenizer/, and the pins
        file), atomically: ``target`` appears only complete, and only if every artifact has the SHA-256 the registry
        pinned (FailedPrecondition otherwise)."""
        private_dir(target.parent)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            for role, artifact in resolved.artifacts.items():
                path = staging / EXPORT_ROLES[role]
                await self._storage.download_to(
                    resolved.tenant,
                    artifact.name,
                    path,
                    kind=storage_pb.OBJECT_KIND_ARTIFACT,
                    version=artifact.version,
                    timeout=self._timeout,
                )
                what = (
                    f"artifact {artifact.name!r} version {artifact.version} ({role} of model {resolved.model!r} "
                    f"version {resolved.version})"
                )
                await asyncio.to_thread(check_artifact, path, artifact.sha256, what)
            await asyncio.to_thread(_unpack_tokenizer, staging / EXPORT_ROLES["tokenizer"], staging / "tokenizer")
            await asyncio.to_thread(seal_export, staging, resolved.pins)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
