"""The gateway's view of deployments: which Triton model and version serve a tenant's model name.

The deployments core writes routes as rollouts complete; the inference gateway reads them on every request (a
dictionary lookup). A route exists only while a version is serving; an UPDATING deployment keeps routing to its old
version until the new one has loaded and answered its probe.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Route", "Routes", "triton_model_name", "TRITON_NAME_SEPARATOR"]

#: Separates tenant and model in Triton model names; tenant names never contain it.
TRITON_NAME_SEPARATOR = "__"


def triton_model_name(tenant: str, model: str) -> str:
    """The name a tenant's deployed model has inside Triton: "<tenant>__<model>"."""
    return f"{tenant}{TRITON_NAME_SEPARATOR}{model}"


@dataclass(frozen=True)
class Route:
    """Where requests for one tenant model go."""

    tenant: str
    #: The tenant's own model name (the registry name).
    model: str
    #: The model's name inside Triton.
    triton_name: str
    #: The version serving, as Triton's version string (the registry version number).
    version: str


class Routes:
    """In-memory route table shared by the deployments core (writer) and the gateway (reader), one event loop."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], Route] = {}

    def get(self, tenant: str, model: str) -> Route | None:
        return self._routes.get((tenant, model))

    def set(self, route: Route) -> None:
        self._routes[(route.tenant, route.model)] = route

    def remove(self, tenant: str, model: str) -> None:
        self._routes.pop((tenant, model), None)

    def all(self) -> list[Route]:
        return list(self._routes.values())
