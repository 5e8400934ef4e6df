"""ModelRegistry: the base models fine-tunes start from (built-in, or registered by a tenant from an uploaded
artifact) and the model registry (models, versions, aliases). Pure Python: storage comes in as an ArtifactGateway."""

from __future__ import annotations

import asyncio
import re
import shutil
import tarfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from services.mesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.mesh.files import private_dir, private_tar_member
from services.training.core.catalog import BaseModelCatalog, describe_model_dir
from services.training.core.model import ArtifactEntry, BaseModelRecord, DatasetVersion, ModelRecord, ModelVersionRecord
from services.training.store import TrainingStore

__all__ = ["ArtifactGateway", "ModelRegistry", "Page", "MODEL_NAME"]

#: Names of models and base models.
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_ALIAS = re.compile(r"^[a-z0-9-]{1,40}$")


class ArtifactGateway(Protocol):
    """What the training service needs from the storage service, acting for the tenant (the caller's identity, or a
    job's submitter through its delegation)."""

    async def fetch_dataset(
        self, tenant: str, name: str, version: int, write: Callable[[memoryview], None]
    ) -> tuple[DatasetVersion, str]:
        """Streams a dataset version's bytes to ``write`` (called in a worker thread, in order); the resolved version
        and its format ("csv"/"jsonl")."""
        ...

    async def fetch_artifact(self, tenant: str, name: str, version: int, target: Path) -> ArtifactEntry:
        """Downloads an artifact version into ``target``."""
        ...

    async def put_artifact(self, tenant: str, name: str, source: Path, role: str) -> ArtifactEntry:
        """Uploads ``source`` as a new version of artifact ``name``."""
        ...


@dataclass(frozen=True)
class Page:
    """One page of a listing and the token of the next ("" at the end)."""

    items: list[Any]
    next_token: str


def page_bounds(page_size: int, page_token: str) -> tuple[int, int]:
    """(offset, limit) of a page request; InvalidArgument for a bad token or size."""
    if page_token and not page_token.isdigit():
        raise InvalidArgument("invalid page token")
    if page_size < 0:
        raise InvalidArgument("page_size must not be negative")
    return int(page_token or 0), min(page_size or 100, 1000)


def now() -> datetime:
    return datetime.now(UTC)


class ModelRegistry:
    """Base models and registered models of every tenant."""

    def __init__(
        self, store: TrainingStore, catalog: BaseModelCatalog, artifacts: ArtifactGateway, base_models_dir: Path
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._artifacts = artifacts
        self._base_models_dir = base_models_dir

    async def _db(self, fn: Any, *args: Any) -> Any:
        return await self._store.db.run(fn, *args)

    # -- base models -----------------------------------------------------------------------------------------

    async def base_model(self, tenant: str, name: str) -> BaseModelRecord:
        """A base model by name: a built-in, else one of the tenant's; InvalidArgument when there is none."""
        if self._catalog.path(name) is not None:
            info = await asyncio.to_thread(self._catalog.describe, name)
            return BaseModelRecord(
                tenant="",
                name=name,
                path=str(self._catalog.path(name)),
                architecture=info.architecture,
                max_seq_length=info.max_seq_length,
                parameter_count=info.parameter_count,
                sha256=info.sha256,
                description="built in",
                created_at=self._catalog.created_at(name),
            )
        record = await self._db(self._store.base_model, tenant, name) if name else None
        if record is None:
            raise InvalidArgument(f"unknown base model {name!r}; see ListBaseModels")
        return record  # type: ignore[no-any-return]

    async def base_models(self, tenant: str) -> list[BaseModelRecord]:
        builtins = [await self.base_model(tenant, name) for name in self._catalog.names()]
        return builtins + list(await self._db(self._store.base_models, tenant))

    async def register_base_model(
        self, tenant: str, name: str, artifact_name: str, artifact_version: int, description: str
    ) -> BaseModelRecord:
        """Downloads the artifact (a tar of a Hugging Face model directory), unpacks and validates it."""
        if not MODEL_NAME.match(name):
            raise InvalidArgument("name must be 1-128 lowercase letters, digits, '.', '_' or '-'")
        if self._catalog.path(name) is not None:
            raise InvalidArgument(f"{name!r} is a built-in base model")
        if await self._db(self._store.base_model, tenant, name) is not None:
            raise AlreadyExists(f"base model {name!r} already exists")
        if not artifact_name:
            raise InvalidArgument("artifact_name is required")
        target = self._base_models_dir / tenant / name
        staging = private_dir(target.with_name(f".{name}.{uuid.uuid4().hex}"))
        try:
            artifact = await self._artifacts.fetch_artifact(
                tenant, artifact_name, artifact_version, staging / "artifact.tar"
            )
            model_dir = staging / "model"
            try:
                await asyncio.to_thread(_untar, staging / "artifact.tar", model_dir)
                info = await asyncio.to_thread(describe_model_dir, model_dir)
            except (ValueError, tarfile.TarError, OSError) as exc:
                raise InvalidArgument(f"artifact {artifact_name!r} is not a usable base model: {exc}") from None
            (staging / "artifact.tar").unlink()
            shutil.rmtree(target, ignore_errors=True)
            model_dir.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        record = BaseModelRecord(
            tenant=tenant,
            name=name,
            path=str(target),
            architecture=info.architecture,
            max_seq_length=info.max_seq_length,
            parameter_count=info.parameter_count,
            sha256=artifact.sha256,
            description=description,
            created_at=now(),
            artifact=replace(artifact, role="hf_model"),
        )
        await self._db(self._store.add_base_model, record)
        return record

    # -- registry --------------------------------------------------------------------------------------------

    async def models(self, tenant: str, page_size: int, page_token: str) -> Page:
        offset, limit = page_bounds(page_size, page_token)
        found = await self._db(self._store.models, tenant, offset, limit + 1)
        return Page(found[:limit], str(offset + limit) if len(found) > limit else "")

    async def _model(self, tenant: str, name: str) -> ModelRecord:
        model = await self._db(self._store.model, tenant, name)
        if model is None:
            raise NotFound(f"model {name!r} not found")
        return model  # type: ignore[no-any-return]

    async def model_versions(self, tenant: str, model: str, page_size: int, page_token: str) -> Page:
        await self._model(tenant, model)
        offset, limit = page_bounds(page_size, page_token)
        found = await self._db(self._store.model_versions, tenant, model, offset, limit + 1)
        return Page(found[:limit], str(offset + limit) if len(found) > limit else "")

    async def model_version(self, tenant: str, model: str, version: int, alias: str) -> ModelVersionRecord:
        """By number, by alias, or (neither) the latest."""
        if version and alias:
            raise InvalidArgument("give version or alias, not both")
        if version < 0:
            raise InvalidArgument("version must not be negative")
        found = await self._model(tenant, model)
        if alias:
            if alias not in found.aliases:
                raise NotFound(f"model {model!r} has no alias {alias!r}")
            version = found.aliases[alias]
        record = await self._db(self._store.model_version, tenant, model, version)
        if record is None:
            raise NotFound(f"model {model!r} has no version {version}")
        return record  # type: ignore[no-any-return]

    async def set_alias(self, tenant: str, model: str, alias: str, version: int) -> ModelRecord:
        if not _ALIAS.match(alias):
            raise InvalidArgument("alias must be 1-40 lowercase letters, digits or '-'")
        if version < 0:
            raise InvalidArgument("version must not be negative")
        await self._model(tenant, model)
        if version and await self._db(self._store.model_version, tenant, model, version) is None:
            raise FailedPrecondition(f"model {model!r} has no version {version}")
        await self._db(self._store.set_alias, tenant, model, alias, version)
        return await self._model(tenant, model)


def _untar(archive: Path, target: Path) -> None:
    """Unpacks a (gzip) tar safely: members stay inside ``target`` and are private; a single top-level directory is
    unwrapped."""
    private_dir(target)
    with tarfile.open(archive, "r:*") as tar:
        tar.extractall(target, filter=private_tar_member)
    entries = list(target.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not (target / "config.json").exists():
        inner = entries[0]
        for child in inner.iterdir():
            child.rename(target / child.name)
        inner.rmdir()
