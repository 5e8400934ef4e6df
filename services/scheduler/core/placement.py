"""Placement: the feasible nodes of a pool (READY, enough free, GPU model matches), the cheapest for the request,
then the best fit on the request's dominant resource; a gang fills the cheapest nodes first, all or nothing."""

from __future__ import annotations

from collections.abc import Iterable

from services.scheduler.core.model import Node, NodeState
from services.scheduler.core.resources import Prices, Resources

__all__ = ["NodeSlot", "place", "capacity_reason", "ready_room", "workers_fitting"]

_R = range(3)


class NodeSlot:
    """A node and what is allocated on it: ``free`` = capacity - used - reserved, kept incrementally."""

    __slots__ = ("node", "name", "cap", "used", "reserved", "free", "prices", "gpu_type", "ready", "jobs")

    def __init__(self, node: Node, prices: Prices) -> None:
        self.name = node.name
        self.used = [0, 0, 0]
        self.reserved = [0, 0, 0]
        self.jobs: dict[str, int] = {}  # admitted job id -> workers on this node
        self.configure(node, prices)

    def configure(self, node: Node, prices: Prices) -> None:
        self.node = node
        self.cap = node.capacity.as_tuple()
        self.gpu_type = node.capacity.gpu_type
        self.prices = prices
        self.ready = node.state is NodeState.READY
        self.free = [self.cap[r] - self.used[r] - self.reserved[r] for r in _R]

    def take(self, q: tuple[int, int, int], workers: int, *, reservation: bool = False, sign: int = 1) -> None:
        """Allocates (sign 1) or frees (sign -1) ``workers`` x ``q``, as an allocation or a reservation."""
        into = self.reserved if reservation else self.used
        for r in _R:
            amount = sign * q[r] * workers
            into[r] += amount
            self.free[r] -= amount

    def matches(self, request: Resources) -> bool:
        return not request.gpus or not request.gpu_type or request.gpu_type == self.gpu_type


def workers_fitting(q: tuple[int, int, int], room: Iterable[int]) -> int:
    """How many workers of ``q`` fit in ``room`` (cpu, memory, gpu)."""
    best = -1
    for need, have in zip(q, room, strict=True):
        if need:
            n = have // need if have > 0 else 0
            if best < 0 or n < best:
                best = n
    return max(best, 0)


def _order(slot: NodeSlot, request: Resources, q: tuple[int, int, int]) -> tuple[int, int, float, str]:
    # Cheapest first; then keep GPU nodes for GPU work; then least leftover on the dominant resource.
    rate = slot.prices.rate(request, slot.gpu_type)
    stranded = slot.free[2] if not q[2] else 0
    dominant, best = 0, -1.0
    for r in _R:
        if q[r] and slot.cap[r] and q[r] / slot.cap[r] > best:
            dominant, best = r, q[r] / slot.cap[r]
    leftover = (slot.free[dominant] - q[dominant]) / slot.cap[dominant] if slot.cap[dominant] else 0.0
    return (rate, stranded, leftover, slot.name)


def place(slots: Iterable[NodeSlot], request: Resources, workers: int) -> list[tuple[NodeSlot, int]] | None:
    """The cheapest placement of ``workers`` x ``request`` on READY nodes, as (node, workers on it) pairs, or None
    when they do not all fit (a gang is never placed in part). Greedy by price is optimal here: every worker is
    the same, so filling the cheapest nodes first minimises the sum."""
    q = request.as_tuple()
    q0, q1, q2 = q
    if workers == 1:
        best: NodeSlot | None = None
        best_key: tuple[int, int, float, str] | None = None
        for slot in slots:
            free = slot.free
            # A resource the job does not ask for never stops it (a reservation may overcommit it for a while).
            if (
                not slot.ready
                or (q0 and free[0] < q0)
                or (q1 and free[1] < q1)
                or (q2 and free[2] < q2)
                or not slot.matches(request)
            ):
                continue
            key = _order(slot, request, q)
            if best_key is None or key < best_key:
                best, best_key = slot, key
        return None if best is None else [(best, 1)]
    feasible = [
        (_order(slot, request, q), slot)
        for slot in slots
        if slot.ready and slot.matches(request) and workers_fitting(q, slot.free)
    ]
    feasible.sort(key=lambda pair: pair[0])
    chosen: list[tuple[NodeSlot, int]] = []
    left = workers
    for _, slot in feasible:
        n = min(left, workers_fitting(q, slot.free))
        if n:
            chosen.append((slot, n))
            left -= n
            if not left:
                return chosen
    return None


def ready_room(slots: Iterable[NodeSlot], request: Resources) -> int:
    """How many workers of ``request`` the READY nodes could hold if they were empty."""
    q = request.as_tuple()
    return sum(workers_fitting(q, slot.cap) for slot in slots if slot.ready and slot.matches(request))


def capacity_reason(request: Resources, workers: int, pool: str, room: int) -> str:
    """Why ``workers`` x ``request`` cannot be placed now (``room``: ready_room()), e.g. "waiting for capacity: no
    READY node in pool default has 2 cpu, 8 GiB, 2 GPUs of type a100 free"."""
    what = request.describe()
    if workers == 1:
        if not room:
            return f"waiting for capacity: no READY node in pool {pool} can hold {what}"
        return f"waiting for capacity: no READY node in pool {pool} has {what} free"
    if room < workers:
        return f"waiting for capacity: the READY nodes of pool {pool} cannot hold {workers} workers of {what}"
    return f"waiting for capacity: the free room in pool {pool} does not hold {workers} workers of {what} at once"
