"""Validation of usage events: exact quantities, known meters, sane times and attributes, and the compact
dedup key of (source, id)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from services.billing.core.meters import METERS, REFERENCE_ATTRIBUTES
from services.billing.core.model import LedgerEntry, UsageEvent
from services.billing.core.periods import from_datetime
from services.billing.core.quantities import parse_event_quantity
from services.mesh.errors import InvalidArgument

_encode_string: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]

__all__ = ["UsageValidator", "key_hash", "canonical_json", "dimensions", "MAX_BATCH"]

#: Most events one RecordUsage call may carry.
MAX_BATCH = 1000
_MAX_ID = 200
_MAX_ATTRIBUTES = 32
_MAX_VALUE = 256
_SOURCE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_TENANT = re.compile(r"[a-z][a-z0-9-]{1,38}[a-z0-9]")
_ATTRIBUTE_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Earlier times are almost certainly unset fields or seconds sent as nanoseconds.
_EARLIEST_NS = from_datetime(datetime(2000, 1, 1, tzinfo=UTC))


def key_hash(source: str, event_id: str) -> int:
    """The 64-bit signed dedup key of (source, id). Equal keys are compared on the full (source, id) too, so a
    collision never merges two events.

    For a time-ordered id (a UUIDv7, as ``services.billing.client.new_event_id`` makes) the key is its 48-bit
    millisecond timestamp followed by 15 bits of hash, so new keys land at the end of the dedup index instead of
    on random pages: that is what makes ingest of such ids faster. Any other id gets a plain 64-bit hash.
    Stored keys are never recomputed: this function must not change.
    """
    digest = hashlib.blake2b(f"{source}\x00{event_id}".encode(), digest_size=8).digest()
    if len(event_id) == 36 and event_id[14] == "7" and event_id[8] == "-" and event_id[13] == "-":
        try:
            millis = int(event_id[:8] + event_id[9:13], 16)
        except ValueError:
            millis = -1
        if millis >= 0:
            return (millis << 15) | (int.from_bytes(digest[:2], "big") & 0x7FFF)
    return int.from_bytes(digest, "big", signed=True)


def canonical_json(attributes: Mapping[str, str]) -> str:
    """Attributes as JSON with sorted keys and no spaces: equal attribute sets give equal strings."""
    if not attributes:
        return "{}"
    return json.dumps(dict(sorted(attributes.items())), separators=(",", ":"), ensure_ascii=False)


def _canonical_pair(attributes: Mapping[str, str]) -> tuple[str, str]:
    """(all attributes, dimensions only) as canonical JSON, in one pass: the same strings ``canonical_json``
    gives. Keys are already validated (no character needs escaping); values go through the C string encoder."""
    pieces = [(key, f'"{key}":{_encode_string(attributes[key])}') for key in sorted(attributes)]
    everything = "{" + ",".join(piece for _, piece in pieces) + "}"
    if not REFERENCE_ATTRIBUTES.intersection(attributes):
        return everything, everything
    return everything, "{" + ",".join(piece for key, piece in pieces if key not in REFERENCE_ATTRIBUTES) + "}"


def dimensions(attributes: Mapping[str, str]) -> dict[str, str]:
    """The attributes usage is aggregated and priced by (every attribute but the references)."""
    return {k: v for k, v in attributes.items() if k not in REFERENCE_ATTRIBUTES}


class UsageValidator:
    """Turns received events into ledger entries, or raises InvalidArgument saying what is wrong."""

    def __init__(self, max_future_ns: int) -> None:
        self._max_future_ns = max_future_ns
        # Names already seen valid (emitters use a handful of sources, tenants and attribute keys), so each
        # regex runs once per name rather than once per event.
        self._good_keys: set[str] = set()
        self._good_names: set[tuple[str, str]] = set()

    def validate(self, event: UsageEvent, now_ns: int, tenant_scope: str) -> LedgerEntry:
        """``tenant_scope`` non-empty: the event must belong to that tenant (an empty event tenant means it)."""
        tenant = event.tenant or tenant_scope
        if not event.id:
            raise InvalidArgument("id is required")
        if len(event.id) > _MAX_ID or _CONTROL.search(event.id):
            raise InvalidArgument(f"id must be 1-{_MAX_ID} characters without control characters")
        if (event.source, tenant) not in self._good_names:
            if not _SOURCE.fullmatch(event.source):
                raise InvalidArgument(f"source {event.source!r} must be a lowercase service name (e.g. 'serving')")
            if not tenant:
                raise InvalidArgument("tenant is required")
            if not _TENANT.fullmatch(tenant):
                raise InvalidArgument(f"tenant {tenant[:50]!r} is not a tenant name")
            if len(self._good_names) < 100_000:
                self._good_names.add((event.source, tenant))
        if tenant_scope and tenant != tenant_scope:
            raise InvalidArgument(f"tenant {tenant!r} differs from the request's tenant {tenant_scope!r}")
        if event.meter not in METERS:
            raise InvalidArgument(f"unknown meter {event.meter!r} (known: {', '.join(METERS)})")
        quantity = parse_event_quantity(event.quantity)
        if event.time_ns < _EARLIEST_NS:
            raise InvalidArgument("time is required (and must be after 2000-01-01)")
        if event.time_ns > now_ns + self._max_future_ns:
            raise InvalidArgument(
                f"time is {(event.time_ns - now_ns) / 1e9:.0f} s in the future "
                f"(at most {self._max_future_ns // 10**9} s allowed)"
            )
        attributes = event.attributes
        if attributes:
            self._check_attributes(attributes)
            attributes_json, dims_json = _canonical_pair(attributes)
        else:
            attributes_json = dims_json = "{}"
        return LedgerEntry(
            key_hash=key_hash(event.source, event.id),
            source=event.source,
            id=event.id,
            tenant=tenant,
            meter=event.meter,
            quantity_nanos=quantity,
            time_ns=event.time_ns,
            attributes_json=attributes_json,
            dims_json=dims_json,
        )

    def _check_attributes(self, attributes: Mapping[str, str]) -> None:
        if len(attributes) > _MAX_ATTRIBUTES:
            raise InvalidArgument(f"at most {_MAX_ATTRIBUTES} attributes")
        good_keys = self._good_keys
        for key, value in attributes.items():
            if key in good_keys:
                pass
            elif _ATTRIBUTE_KEY.fullmatch(key):
                if len(good_keys) < 10_000:
                    good_keys.add(key)
            else:
                raise InvalidArgument(f"attribute key {key[:70]!r} must be lowercase letters, digits, '_', '.', '-'")
            if len(value) > _MAX_VALUE or _CONTROL.search(value):
                raise InvalidArgument(
                    f"attribute {key!r} must be at most {_MAX_VALUE} characters without control characters"
                )
