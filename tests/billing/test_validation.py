"""Usage-event validation details: the one-pass canonical JSON equals the reference encoding, dedup keys of
time-ordered ids follow their time, and names cached as valid never let an invalid one through."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing.client import new_event_id
from services.billing.core.model import UsageEvent
from services.billing.core.usage import UsageValidator, _canonical_pair, canonical_json, dimensions, key_hash
from services.mesh.errors import InvalidArgument
from tests.billing.conftest import NOW

keys = st.one_of(
    st.sampled_from(["model", "request_id", "trace_id", "gpu_type", "job"]),
    st.from_regex(r"[a-z][a-z0-9_.-]{0,10}", fullmatch=True),
)


@given(st.dictionaries(keys, st.text(max_size=20), max_size=8))
def test_canonical_pair_equals_the_reference_json(attributes: dict[str, str]) -> None:
    everything, dims = _canonical_pair(attributes)
    assert everything == canonical_json(attributes)
    assert dims == canonical_json(dimensions(attributes))
    assert json.loads(everything) == attributes


def test_time_ordered_ids_get_time_ordered_keys_and_others_random_ones() -> None:
    ordered = [key_hash("serving", new_event_id(NOW + i * 1_000_000)) for i in range(200)]
    assert ordered == sorted(ordered) and all(k > 0 for k in ordered)
    assert key_hash("serving", "req-1") != key_hash("training", "req-1")
    # Not a UUIDv7 (version 4, or malformed hex): a plain 64-bit hash.
    v4 = "0f0e7c2a-1b2c-4d3e-8f40-123456789abc"
    assert key_hash("serving", v4) == key_hash("serving", v4)
    assert key_hash("serving", "zzzzzzzz-zzzz-7zzz-8zzz-zzzzzzzzzzzz") != 0


def test_a_cached_valid_pair_does_not_admit_invalid_names() -> None:
    validator = UsageValidator(300 * 10**9)
    good = UsageEvent("serving", "a", "acme", "gpu_seconds", "1", NOW)
    validator.validate(good, NOW, "")
    for bad, fragment in [
        (good._replace(source="Serving"), "source"),
        (good._replace(tenant="Acme"), "tenant"),
        (good._replace(attributes={"Bad Key": "x"}), "attribute key"),
    ]:
        with pytest.raises(InvalidArgument, match=fragment):
            validator.validate(bad, NOW, "")
