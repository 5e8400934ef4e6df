"""Deployments: registry versions written into Triton's live repository, loaded explicitly, probed, switched.

A rollout (first deploy, version switch, alias move, shape change) runs as a task of its own:

1. stage: the export is fetched from storage into ``<serving_dir>/exports/<triton name>/<version>`` (kept while the
   version is deployed, so a lost live repository or an interrupted rollout can be rebuilt without the registry),
   each artifact checked against the SHA-256 the registry pinned, and checked again against those pins at every
   deploy and reload (pins.py);
2. write the version into the live repository, with a config that keeps the serving version *and* the new one;
3. load (Triton keeps the old model serving while it reloads), then probe the new version with a real inference;
4. switch the gateway's route to the new version, then retire the old one (config with the new version only).

If anything before the switch fails, the previous version keeps serving and the failure is kept in ``last_error``;
with no previous version the deployment ends FAILED. A reconcile loop reloads deployments Triton has lost (a Triton
restart forgets explicitly loaded models) and follows moved aliases.

With replicas: rollouts, undeploys, the reconcile loop and alias following run on the leader (``lead``; the other
replicas forward Deploy and Undeploy to it), while every replica serves inference and keeps its gateway's routes in
step with the store (``follow_routes``, every ``route_refresh_seconds``). So the leader retires a replaced version
only after that long, when every replica routes to the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from services.mesh.errors import AidcError, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from services.mesh.identity import as_service
from services.mesh.interceptors import current_deadline
from services.mesh.pages import parse_offset
from services.serving.core.model import SERVING_STATES, DeploymentRecord, DeploymentState
from services.serving.pins import verify_export
from services.serving.registry import ResolvedVersion
from services.serving.repository import DeploymentShape, ExportBundle, LiveRepository, check_probe_result, probe_request
from services.serving.routes import TRITON_NAME_SEPARATOR, Route, Routes, triton_model_name
from services.serving.store import DeploymentStore
from services.serving.triton import TritonControl

__all__ = ["DeploymentsCore", "ModelSource", "RolloutOptions", "Page", "DeployRequest"]

log = logging.getLogger(__name__)

_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_ALIAS = re.compile(r"^[a-z0-9-]{1,40}$")
_MAX_INSTANCES = 16
_MAX_BATCH = 1024
_DEFAULT_PAGE = 100


class ModelSource(Protocol):
    """Where versions come from (the registry and storage)."""

    async def resolve(self, tenant: str, model: str, version: int = 0, alias: str = "") -> ResolvedVersion: ...

    async def fetch(self, resolved: ResolvedVersion, target: Path) -> None: ...


@dataclass(frozen=True)
class RolloutOptions:
    exports_dir: Path
    rollout_timeout_seconds: float = 300.0
    reconcile_interval_seconds: float = 2.0
    alias_poll_seconds: float = 10.0
    route_refresh_seconds: float = 1.0


@dataclass(frozen=True)
class DeployRequest:
    tenant: str
    model: str
    version: int = 0
    alias: str = ""
    instance_count: int = 1
    max_batch_size: int = 8
    wait: bool = False


@dataclass(frozen=True)
class Page:
    items: list[DeploymentRecord]
    next_token: str


def _validate(request: DeployRequest) -> None:
    if not _MODEL_NAME.match(request.model):
        raise InvalidArgument(f"model {request.model!r} is not a registry model name")
    if TRITON_NAME_SEPARATOR in request.model:
        raise InvalidArgument(f"model {request.model!r}: names containing {TRITON_NAME_SEPARATOR!r} can't be served")
    if request.version < 0:
        raise InvalidArgument("version must not be negative")
    if request.version and request.alias:
        raise InvalidArgument("give a version or an alias, not both")
    if request.alias and not _ALIAS.match(request.alias):
        raise InvalidArgument(f"alias {request.alias!r} is not valid (lowercase letters, digits, '-')")
    if not 1 <= request.instance_count <= _MAX_INSTANCES:
        raise InvalidArgument(f"instance_count must be between 1 and {_MAX_INSTANCES}")
    if not 0 <= request.max_batch_size <= _MAX_BATCH:
        raise InvalidArgument(f"max_batch_size must be between 0 and {_MAX_BATCH}")


def _shape(record: DeploymentRecord) -> DeploymentShape:
    return DeploymentShape(instance_count=record.instance_count, max_batch_size=record.max_batch_size)


def _now() -> datetime:
    return datetime.now(UTC)


async def _detached(work: Coroutine[Any, Any, DeploymentRecord]) -> DeploymentRecord:
    """Runs a rollout free of the deadline of the RPC that started it (it outlives that call); the caller's
    identity stays, so the export is fetched with the deploying user's token."""
    current_deadline.set(None)
    return await work


class DeploymentsCore:
    """Deploy, undeploy, list; rollouts and the reconcile loop. All state changes go through the store first."""

    def __init__(
        self,
        store: DeploymentStore,
        source: ModelSource,
        repository: LiveRepository,
        triton: TritonControl,
        routes: Routes,
        options: RolloutOptions,
    ) -> None:
        self._store = store
        self._source = source
        self._repository = repository
        self._triton = triton
        self._routes = routes
        self._options = options
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._rollouts: dict[tuple[str, str], asyncio.Task[DeploymentRecord]] = {}
        self._background: asyncio.Task[None] | None = None
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> bool:
        """Routes every serving deployment and keeps following the store's routes (every replica)."""
        if self._started:
            return True
        await self.follow_routes()
        self._background = asyncio.create_task(self._follow_routes_forever(), name="serving-routes")
        self._started = True
        return True

    async def lead(self) -> None:
        """The leader's work, until cancelled: resumes interrupted rollouts and undeploys, then reconciles and follows
        aliases. Doesn't wait for Triton: the loop loads deployments whenever Triton is (or comes back) up. When
        leading ends, this replica's rollouts are cancelled too; the next leader resumes them."""
        try:
            for record in await asyncio.to_thread(self._store.all):
                if (record.tenant, record.model) in self._rollouts:
                    continue
                if record.state is DeploymentState.UNLOADING:
                    self._spawn(record, self._finish_undeploy(record))
                elif record.state is DeploymentState.UPDATING or record.state is DeploymentState.LOADING:
                    self._spawn(record, self._rollout(record, record.target_version))
            await self._reconcile_forever()
        finally:
            for task in list(self._rollouts.values()):
                task.cancel()

    async def close(self) -> None:
        tasks = [t for t in [self._background, *self._rollouts.values()] if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- RPCs ----------------------------------------------------------------------------------------------

    async def deploy(self, request: DeployRequest, caller: str, timeout: float | None = None) -> DeploymentRecord:
        """Starts a rollout (or returns the deployment unchanged if it already serves what is asked); with
        ``request.wait``, waits up to ``timeout`` seconds for its outcome (the rollout goes on after a timeout)."""
        _validate(request)
        resolved = await self._source.resolve(request.tenant, request.model, request.version, request.alias)
        key = (request.tenant, request.model)
        async with self._lock(key):
            if key in self._rollouts:
                current = await self._get(request.tenant, request.model)
                raise FailedPrecondition(
                    f"a rollout of {request.model!r} version {current.target_version} is in progress; "
                    "retry when it ends"
                )
            existing = await asyncio.to_thread(self._store.get, request.tenant, request.model)
            now = _now()
            if existing is None:
                record = DeploymentRecord(
                    tenant=request.tenant,
                    model=request.model,
                    triton_name=triton_model_name(request.tenant, request.model),
                    state=DeploymentState.LOADING,
                    version=0,
                    target_version=resolved.version,
                    alias=request.alias,
                    instance_count=request.instance_count,
                    max_batch_size=request.max_batch_size,
                    created_by=caller,
                    create_time=now,
                    update_time=now,
                )
            elif (
                existing.state is DeploymentState.READY
                and existing.version == resolved.version
                and (existing.alias, existing.instance_count, existing.max_batch_size)
                == (request.alias, request.instance_count, request.max_batch_size)
            ):
                return existing
            else:
                state = DeploymentState.UPDATING if existing.version else DeploymentState.LOADING
                record = existing.with_changes(
                    now,
                    state=state,
                    target_version=resolved.version,
                    alias=request.alias,
                    instance_count=request.instance_count,
                    max_batch_size=request.max_batch_size,
                )
            await asyncio.to_thread(self._store.save, record)
            # The export is fetched now, with the caller's credentials; the rest runs on its own.
            task = self._spawn(record, self._rollout(record, resolved.version, resolved))
        if not request.wait:
            return record
        try:
            done = await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{request.model!r} version {resolved.version} is still rolling out; follow it with GetDeployment"
            ) from None
        if done.state is not DeploymentState.READY or done.version != resolved.version:
            raise FailedPrecondition(
                f"rollout of {request.model!r} version {resolved.version} failed: {done.last_error}"
            )
        return done

    async def undeploy(self, tenant: str, model: str) -> DeploymentRecord:
        """Stops routing at once, then unloads and removes; returns the deployment as it was."""
        key = (tenant, model)
        rollout = self._rollouts.get(key)
        if rollout is not None:
            rollout.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await rollout
        async with self._lock(key):
            record = await self._get(tenant, model)
            self._routes.remove(tenant, model)
            unloading = record.with_changes(_now(), state=DeploymentState.UNLOADING)
            await asyncio.to_thread(self._store.save, unloading)
            await self._finish_undeploy(unloading)
        return record

    async def get(self, tenant: str, model: str) -> DeploymentRecord:
        return await self._get(tenant, model)

    async def list(self, tenant: str, page_size: int = 0, page_token: str = "") -> Page:
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        offset = parse_offset(page_token)
        limit = min(page_size or _DEFAULT_PAGE, 1000)
        items = await asyncio.to_thread(self._store.page, tenant, offset, limit + 1)
        next_token = str(offset + limit) if len(items) > limit else ""
        return Page(items[:limit], next_token)

    # -- rollouts ------------------------------------------------------------------------------------------

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def _get(self, tenant: str, model: str) -> DeploymentRecord:
        record = await asyncio.to_thread(self._store.get, tenant, model)
        if record is None:
            raise NotFound(f"model {model!r} is not deployed in tenant {tenant!r}")
        return record

    def _spawn(
        self, record: DeploymentRecord, work: Coroutine[Any, Any, DeploymentRecord]
    ) -> asyncio.Task[DeploymentRecord]:
        key = (record.tenant, record.model)
        task = asyncio.create_task(_detached(work), name=f"rollout-{record.triton_name}")
        self._rollouts[key] = task

        def forget(done: asyncio.Task[DeploymentRecord]) -> None:
            if self._rollouts.get(key) is done:
                del self._rollouts[key]

        task.add_done_callback(forget)
        return task

    def _route(self, record: DeploymentRecord, version: int) -> None:
        self._routes.set(Route(record.tenant, record.model, record.triton_name, str(version)))

    def _export_dir(self, record: DeploymentRecord, version: int) -> Path:
        return self._options.exports_dir / record.triton_name / str(version)

    async def _export(
        self, record: DeploymentRecord, version: int, resolved: ResolvedVersion | None
    ) -> tuple[ExportBundle, Mapping[str, str]]:
        """The unpacked export of ``version`` and its files' SHA-256s, checked against the registry's pins: staged
        already and still exactly as fetched (and, given ``resolved``, fetched for the same pins), else fetched (as
        the caller when ``resolved`` came from the Deploy RPC, else as this service), which checks every artifact
        against its pin. FailedPrecondition when storage holds other bytes than the registry pinned."""
        target = self._export_dir(record, version)
        pins = None if resolved is None else resolved.pins
        if target.is_dir():
            try:
                files = (await asyncio.to_thread(verify_export, target, pins)).files
            except FailedPrecondition as error:
                log.warning("fetching %s version %d again: %s", record.triton_name, version, error)
                await asyncio.to_thread(shutil.rmtree, target, True)
            else:
                return await asyncio.to_thread(ExportBundle.load, target), files
        if resolved is None:
            with as_service():
                resolved = await self._source.resolve(record.tenant, record.model, version)
        await self._source.fetch(resolved, target)
        files = (await asyncio.to_thread(verify_export, target, resolved.pins)).files
        return await asyncio.to_thread(ExportBundle.load, target), files

    async def _rollout(
        self, record: DeploymentRecord, version: int, resolved: ResolvedVersion | None = None
    ) -> DeploymentRecord:
        name = record.triton_name
        previous = record.version
        shape = _shape(record)
        try:
            async with asyncio.timeout(self._options.rollout_timeout_seconds):
                bundle, files = await self._export(record, version, resolved)
                if not await asyncio.to_thread(self._repository.holds, name, version, files):
                    await asyncio.to_thread(self._repository.write_version, name, version, bundle)
                both = sorted({previous, version} - {0})
                await asyncio.to_thread(self._repository.write_config, name, both, shape, bundle)
                await self._triton.load(self._repository.load_order(name))
                await self._probe(name, version, bundle)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            return await self._roll_back(
                record, version, f"rollout timed out after {self._options.rollout_timeout_seconds:g}s"
            )
        except AidcError as error:
            return await self._roll_back(record, version, str(error))
        except Exception as error:  # noqa: BLE001 - any failure of a rollout is reported on the deployment
            log.exception("rollout of %s version %d failed", name, version)
            return await self._roll_back(record, version, f"{type(error).__name__}: {error}")
        self._route(record, version)
        ready = record.with_changes(_now(), state=DeploymentState.READY, version=version, target_version=0)
        await asyncio.to_thread(self._store.save, ready)
        log.info("%s now serves version %d (was %d)", name, version, previous)
        if previous and previous != version:
            # Other replicas switch their routes within route_refresh_seconds of the save: retire after that.
            await asyncio.sleep(self._options.route_refresh_seconds + 0.5)
            await self._retire(ready, previous, bundle)
        return ready

    async def _probe(self, name: str, version: int, bundle: ExportBundle) -> None:
        inputs, outputs = probe_request(bundle)
        result = await self._triton.infer(name, version, inputs, outputs)
        check_probe_result(bundle, result)

    async def _retire(self, record: DeploymentRecord, old: int, bundle: ExportBundle) -> None:
        """Unloads the old version now that the route points at the new one; failures here only leave files."""
        name = record.triton_name
        try:
            await asyncio.to_thread(self._repository.write_config, name, [record.version], _shape(record), bundle)
            await self._triton.load(self._repository.load_order(name))
            await asyncio.to_thread(self._repository.remove_version, name, old)
            await asyncio.to_thread(shutil.rmtree, self._export_dir(record, old), True)
        except AidcError as error:
            log.warning("could not retire %s version %d yet: %s", name, old, error)

    async def _roll_back(self, record: DeploymentRecord, version: int, reason: str) -> DeploymentRecord:
        """The previous version keeps serving (restored as the only one configured); with none, FAILED."""
        name = record.triton_name
        log.warning("rollout of %s version %d failed: %s", name, version, reason)
        now = _now()
        try:
            if record.version and record.version != version:
                bundle = await asyncio.to_thread(ExportBundle.load, self._export_dir(record, record.version))
                await asyncio.to_thread(self._repository.write_config, name, [record.version], _shape(record), bundle)
                await self._triton.load(self._repository.load_order(name))
                await asyncio.to_thread(self._repository.remove_version, name, version)
                await asyncio.to_thread(shutil.rmtree, self._export_dir(record, version), True)
            elif not record.version:
                await self._triton.unload(list(reversed(self._repository.load_order(name))))
                await asyncio.to_thread(self._repository.remove, name)
        except AidcError as error:
            log.warning("cleaning up after the failed rollout of %s: %s", name, error)
        state = DeploymentState.READY if record.version else DeploymentState.FAILED
        message = f"rollout of version {version} failed: {reason}"
        failed = record.failed_with(now, message, state=state, target_version=0)
        await asyncio.to_thread(self._store.save, failed)
        return failed

    async def _finish_undeploy(self, record: DeploymentRecord) -> DeploymentRecord:
        name = record.triton_name
        await self._triton.unload(list(reversed(self._repository.load_order(name))))
        await asyncio.to_thread(self._repository.remove, name)
        await asyncio.to_thread(shutil.rmtree, self._options.exports_dir / name, True)
        await asyncio.to_thread(self._store.delete, record.tenant, record.model)
        log.info("undeployed %s", name)
        return record

    # -- reconciling -----------------------------------------------------------------------------------------

    async def follow_routes(self) -> None:
        """Routes as the store has them (a rollout or undeploy the leader completed switches this replica's gateway
        too); deployments this replica is rolling out itself route as their rollout decides."""
        serving = {
            (r.tenant, r.model): r
            for r in await asyncio.to_thread(self._store.all)
            if r.state in SERVING_STATES and r.version
        }
        for key, record in serving.items():
            route = self._routes.get(*key)
            if key not in self._rollouts and (route is None or route.version != str(record.version)):
                self._route(record, record.version)
        for route in self._routes.all():
            key = (route.tenant, route.model)
            if key not in serving and key not in self._rollouts:
                self._routes.remove(*key)

    async def _follow_routes_forever(self) -> None:
        while True:
            await asyncio.sleep(self._options.route_refresh_seconds)
            try:
                await self.follow_routes()
            except Exception:  # noqa: BLE001 - the loop must survive anything and try again
                log.exception("following the stored routes failed")

    async def _reconcile_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_alias_check = loop.time()
        while True:
            try:
                await self.reconcile()
                if loop.time() >= next_alias_check:
                    next_alias_check = loop.time() + self._options.alias_poll_seconds
                    await self.follow_aliases()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must survive anything and try again
                log.exception("reconciling deployments failed")
            await asyncio.sleep(self._options.reconcile_interval_seconds)

    async def reconcile(self) -> int:
        """Loads serving deployments Triton doesn't have (after a Triton restart); returns how many it reloaded."""
        if not await self._triton.live():
            return 0
        reloaded = 0
        for record in await asyncio.to_thread(self._store.all):
            key = (record.tenant, record.model)
            if record.state not in SERVING_STATES or not record.version or key in self._rollouts:
                continue
            if await self._triton.ready(record.triton_name, record.version):
                continue
            async with self._lock(key):
                reloaded += await self._reload(record)
        return reloaded

    async def _reload(self, record: DeploymentRecord) -> int:
        name = record.triton_name
        try:
            # What Triton will load is checked against the pins first: a live version that differs from its
            # export (or a staged export that differs from the registry's pins) is written again.
            bundle, files = await self._export(record, record.version, None)
            if not await asyncio.to_thread(self._repository.holds, name, record.version, files):
                await asyncio.to_thread(self._repository.write_version, name, record.version, bundle)
                await asyncio.to_thread(self._repository.write_config, name, [record.version], _shape(record), bundle)
            await self._triton.load(self._repository.load_order(name))
        except AidcError as error:
            log.warning("reloading %s version %d failed: %s", name, record.version, error)
            failed = record.failed_with(_now(), f"reloading version {record.version} failed: {error}")
            await asyncio.to_thread(self._store.save, failed)
            return 0
        log.info("reloaded %s version %d into Triton", name, record.version)
        return 1

    async def follow_aliases(self) -> None:
        """Starts a rollout for each deployment whose alias now points at another version."""
        for record in await asyncio.to_thread(self._store.all):
            key = (record.tenant, record.model)
            if not record.alias or record.state is not DeploymentState.READY or key in self._rollouts:
                continue
            try:
                with as_service():
                    resolved = await self._source.resolve(record.tenant, record.model, alias=record.alias)
            except AidcError as error:
                log.info("alias %s of %s not resolved: %s", record.alias, record.triton_name, error)
                continue
            if resolved.version == record.version:
                continue
            async with self._lock(key):
                updating = record.with_changes(_now(), state=DeploymentState.UPDATING, target_version=resolved.version)
                await asyncio.to_thread(self._store.save, updating)
                self._spawn(updating, self._rollout(updating, resolved.version))
            log.info("alias %s of %s moved to version %d", record.alias, record.triton_name, resolved.version)

    async def wait_idle(self, predicate: Callable[[], bool] | None = None) -> None:
        """Waits for running rollouts to end (tests and shutdown)."""
        while self._rollouts and (predicate is None or not predicate()):
            await asyncio.gather(*self._rollouts.values(), return_exceptions=True)
