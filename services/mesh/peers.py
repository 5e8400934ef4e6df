"""Who is at the other end of a call: the client's address for per-client limits, taken from the connection, or,
when the connection comes from a trusted proxy (a gateway in front of the tenant path), from the address that proxy
appended to ``x-forwarded-for``."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["ProxyNetworks", "parse_proxies", "client_address"]

ProxyNetworks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]


def parse_proxies(value: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Comma-separated addresses or CIDR networks; ValueError on a bad entry."""
    return [ipaddress.ip_network(item.strip(), strict=False) for item in value.split(",") if item.strip()]


def _host(peer: str) -> str:
    """The address of a gRPC peer string: "ipv4:10.0.0.1:5000" -> "10.0.0.1", "ipv6:[::1]:5000" -> "::1"."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer  # "unix:..." and the like: the whole string names the source


def _trusted(address: str, proxies: ProxyNetworks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)


def client_address(peer: str, metadata: Iterable[tuple[str, str | bytes]], proxies: ProxyNetworks = ()) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the right-most address of
    ``x-forwarded-for`` that is not itself a trusted proxy (addresses further left are the client's own claims)."""
    address = _host(peer)
    if not proxies or not _trusted(address, proxies):
        return address
    forwarded: list[str] = []
    for key, value in metadata:
        if key == "x-forwarded-for":
            text = value.decode() if isinstance(value, bytes) else value
            forwarded += [part.strip() for part in text.split(",") if part.strip()]
    for hop in reversed(forwarded):
        if not _trusted(hop, proxies):
            return hop
    return address
