"""A tenant's keys in the storage service: the active tenant key that wraps new data keys, rotation (re-wrapping
without re-encrypting), crypto-shredding, and the tenant's pseudonym key, the HMAC key of masking's tokens.

The pseudonym key is 256 random bits created on a tenant's first pseudonymized upload and stored only wrapped by the
active tenant key (like a data key), so the key manager's protection covers it: rotating the tenant key re-wraps it
and its tokens stay stable, destroying the tenant's keys destroys it and nothing can link its tokens again; the
next pseudonymized upload then starts a new key with new tokens.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from services.mesh.errors import Aborted, AidcError, InvalidArgument
from services.storage.core.crypto import KeyDestroyed, KeyManager, data_key_context, pseudonym_key_context
from services.storage.core.model import PseudonymKeyRecord
from services.storage.core.pii import Pseudonymizer
from services.storage.store import KeyUnusable, StorageStore

__all__ = ["TenantKeys"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_REWRAP_BATCH = 200
_ATTEMPTS = 8


class TenantKeys:
    """Tenant-key operations over the metadata store and the key manager."""

    def __init__(self, store: StorageStore, keys: KeyManager) -> None:
        self._store = store
        self._keys = keys
        self._rotation_locks: dict[str, asyncio.Lock] = {}

    async def _db(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await self._store.db.run(fn, *args)

    async def active(self, tenant: str) -> str:
        """The id of the tenant's active key, created on first use."""
        key_id = await self._db(self._store.active_key, tenant)
        if key_id is not None:
            return key_id
        new = await self._keys.create_key(tenant)
        if await self._db(self._store.install_first_key, tenant, new):
            log.info("created the first key of tenant %s", tenant)
            return new
        await self._keys.destroy_key(tenant, new)
        key_id = await self._db(self._store.active_key, tenant)
        if key_id is None:
            raise Aborted("the tenant's keys changed concurrently; retry")
        return key_id

    async def reconcile_destroyed(self) -> None:
        """Makes sure the key manager holds no material of keys the database says were destroyed (a crash
        between the two steps of destroying a key)."""
        for tenant, key_id in await self._db(self._store.destroyed_key_ids):
            await self._keys.destroy_key(tenant, key_id)

    async def rotate(self, tenant: str) -> tuple[str, int]:
        """Makes a new tenant key active and re-wraps every data key (content is not re-encrypted) and the pseudonym
        key with it; then destroys the previous keys, which nothing needs any more. Returns the new key's id and the
        number of data keys re-wrapped."""
        lock = self._rotation_locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            new = await self._keys.create_key(tenant)
            retired = await self._db(self._store.install_key, tenant, new)
            rewrapped = 0
            failed: set[str] = set()
            while True:
                batch = [
                    r
                    for r in await self._db(self._store.versions_to_rewrap, tenant, new, _REWRAP_BATCH + len(failed))
                    if r.object_id not in failed
                ]
                if not batch:
                    break
                for record in batch:
                    context = data_key_context(
                        record.tenant, record.kind.value, record.name, record.version, record.object_id, record.s3_key
                    )
                    try:
                        plain = await self._keys.unwrap(tenant, record.key_id, record.wrapped_key, context)
                    except AidcError as exc:
                        log.error("cannot re-wrap %s v%d: %s", record.name, record.version, exc.message)
                        failed.add(record.object_id)
                        continue
                    wrapped = await self._keys.wrap(tenant, new, plain, context)
                    if await self._db(self._store.rewrap, record.object_id, record.key_id, new, wrapped):
                        rewrapped += 1
            await self._rewrap_pseudonym_key(tenant, new)
            for key_id in retired:
                if await self._db(self._store.destroy_if_unused, tenant, key_id):
                    await self._keys.destroy_key(tenant, key_id)
            log.info("rotated the key of tenant %s: %s, %d data keys re-wrapped", tenant, new, rewrapped)
            return new, rewrapped

    async def _rewrap_pseudonym_key(self, tenant: str, new: str) -> None:
        record = await self._db(self._store.pseudonym_key, tenant)
        if record is None or record.key_id == new:
            return
        context = pseudonym_key_context(tenant, record.pseudonym_key_id)
        try:
            plain = await self._keys.unwrap(tenant, record.key_id, record.wrapped, context)
        except AidcError as exc:  # the old key then stays (retired) until a rotation succeeds
            log.error("cannot re-wrap the pseudonym key of tenant %s: %s", tenant, exc.message)
            return
        wrapped = await self._keys.wrap(tenant, new, plain, context)
        await self._db(self._store.rewrap_pseudonym_key, tenant, record.key_id, new, wrapped)

    async def destroy_all(self, tenant: str, confirm_tenant: str) -> tuple[int, int]:
        """Crypto-shreds the tenant: destroys every one of its keys, and with them its pseudonym key. Returns
        (keys destroyed, versions shredded)."""
        if confirm_tenant != tenant:
            raise InvalidArgument("confirm_tenant must repeat the tenant whose keys are to be destroyed")
        key_ids, shredded = await self._db(self._store.destroy_all_keys, tenant)
        for key_id in key_ids:
            await self._keys.destroy_key(tenant, key_id)
        log.warning("destroyed %d keys of tenant %s: %d object versions are unreadable", len(key_ids), tenant, shredded)
        return len(key_ids), shredded

    async def pseudonymizer(self, tenant: str) -> Pseudonymizer:
        """The tenant's pseudonymizer, its key created (wrapped by the active tenant key) on first use."""
        for _ in range(_ATTEMPTS):
            record = await self._db(self._store.pseudonym_key, tenant)
            if record is not None:
                context = pseudonym_key_context(tenant, record.pseudonym_key_id)
                try:
                    material = await self._keys.unwrap(tenant, record.key_id, record.wrapped, context)
                except KeyDestroyed:
                    continue  # re-wrapped by a rotation, or shredded, meanwhile
                return Pseudonymizer(material, record.pseudonym_key_id)
            key_id = await self.active(tenant)
            pseudonym_key_id = f"pk-{secrets.token_hex(12)}"
            material = secrets.token_bytes(32)
            context = pseudonym_key_context(tenant, pseudonym_key_id)
            try:
                wrapped = await self._keys.wrap(tenant, key_id, material, context)
            except KeyDestroyed:
                continue  # shredded meanwhile
            new = PseudonymKeyRecord(tenant, pseudonym_key_id, key_id, wrapped, datetime.now(UTC))
            try:
                if await self._db(self._store.install_pseudonym_key, new):
                    log.info("created the pseudonym key of tenant %s", tenant)
                    return Pseudonymizer(material, pseudonym_key_id)
            except KeyUnusable:
                continue
        raise Aborted("the tenant's keys changed concurrently; retry")
