"""How many items a request may carry: every repeated field and map of every request message, at any depth, is
bounded (256 items, or its ``(aidc.common.v1.max_items)`` option in the contract) and checked in one place before
any servicer code runs, so no single request can make a service loop over an unbounded list."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.gen.aidc.common.v1 import common_pb2
from services.mesh.errors import InvalidArgument

__all__ = ["DEFAULT_MAX_ITEMS", "RequestLimits"]

#: Items a repeated field or map may hold when its declaration names no ``max_items``.
DEFAULT_MAX_ITEMS = 256


@dataclass(frozen=True)
class _Bound:
    """One field to look at: its item limit (0 for a singular message field) and what to check inside."""

    name: str
    limit: int
    inner: _Plan | None
    repeated: bool
    map_values: bool


@dataclass
class _Plan:
    """The fields of one message type that hold, or lead to, repeated fields or maps."""

    bounds: list[_Bound] = field(default_factory=list)


class _TooMany(Exception):
    def __init__(self, path: list[str], limit: int, count: int) -> None:
        self.path, self.limit, self.count = path, limit, count


def _map_value_type(descriptor: FieldDescriptor) -> Descriptor | None:
    entry = descriptor.message_type
    if entry is None or not entry.GetOptions().map_entry:
        return None
    value = entry.fields_by_name["value"]
    return value.message_type  # type: ignore[no-any-return]


class RequestLimits:
    """Checks messages against their item limits; the plan of each message type is worked out once.

    A type whose fields hold no repeated field or map at any depth costs one dictionary lookup per message.
    """

    def __init__(self, default_max_items: int = DEFAULT_MAX_ITEMS) -> None:
        self._default = default_max_items
        self._by_name: dict[str, _Plan | None] = {}
        self._by_type: dict[type, _Plan | None] = {}

    def plan_of(self, descriptor: Descriptor) -> _Plan | None:
        """What to check in messages of this type; None when nothing in them can grow."""
        name = descriptor.full_name
        if name in self._by_name:
            return self._by_name[name]
        plan = _Plan()
        # Registered before the fields are walked, so recursive types (google.protobuf.Struct) refer to it.
        self._by_name[name] = plan
        for f in descriptor.fields:
            if f.is_repeated:
                options = f.GetOptions()
                limit = options.Extensions[common_pb2.max_items] if options.HasExtension(common_pb2.max_items) else 0
                value_type = _map_value_type(f)
                is_map = f.message_type is not None and f.message_type.GetOptions().map_entry
                element = value_type if is_map else f.message_type
                inner = None if element is None else self.plan_of(element)
                plan.bounds.append(_Bound(f.name, limit or self._default, inner, True, bool(is_map)))
            elif f.message_type is not None:
                inner = self.plan_of(f.message_type)
                if inner is not None:
                    plan.bounds.append(_Bound(f.name, 0, inner, False, False))
        if not plan.bounds:
            self._by_name[name] = None
            return None
        return plan

    def check(self, message: Any) -> None:
        """InvalidArgument naming the field (e.g. ``price_book.plans[2].prices``) when one holds too many items."""
        kind = type(message)
        try:
            plan = self._by_type[kind]
        except KeyError:
            descriptor = getattr(kind, "DESCRIPTOR", None)
            plan = self.plan_of(descriptor) if isinstance(descriptor, Descriptor) else None
            self._by_type[kind] = plan
        if plan is None:
            return
        try:
            _check(message, plan)
        except _TooMany as error:
            path = "".join(reversed(error.path)).lstrip(".")
            raise InvalidArgument(f"{path} holds {error.count} items; at most {error.limit} are allowed") from None


def _check(message: Any, plan: _Plan) -> None:
    for bound in plan.bounds:
        inner = bound.inner
        name = bound.name
        if not bound.repeated:
            if inner is not None and message.HasField(name):
                try:
                    _check(getattr(message, name), inner)
                except _TooMany as error:
                    error.path.append(f".{name}")
                    raise
            continue
        items = getattr(message, name)
        count = len(items)
        if count > bound.limit:
            raise _TooMany([f".{name}"], bound.limit, count)
        if inner is None or not count:
            continue
        position: object = None
        try:
            for position, item in items.items() if bound.map_values else enumerate(items):  # noqa: B007 - named below
                _check(item, inner)
        except _TooMany as error:
            # The path is spelled out only on the way out of a refusal, never for a request within its limits.
            error.path.append(f".{name}[{position!r}]")
            raise
