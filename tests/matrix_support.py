"""Shared pieces of the authorization matrix: the roles, and what each service contributes
(``tests/<svc>/matrix.py`` defines ``UNDER_TEST``)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

PASSWORD = "correct horse battery"
TENANT_ROLES = ("tenant-admin", "developer", "viewer", "billing-viewer")
ROLES = (*TENANT_ROLES, "platform-admin")
EVERYONE = frozenset(ROLES)
ADMINS = frozenset({"tenant-admin", "platform-admin"})
PLATFORM = frozenset({"platform-admin"})
#: The user holding each tenant role, in tenants acme (own) and globex (other).
USERS = {"tenant-admin": "tadmin", "developer": "dev", "viewer": "viewer", "billing-viewer": "billing"}


@dataclass(frozen=True)
class ServiceUnderTest:
    """One service's part of the matrix.

    ``expected[rpc]`` is who may call ``rpc`` on their own tenant (the platform admin acts on every tenant);
    RPCs in ``tenant_free`` decide the same whatever tenant the request names; ``build_request(rpc, tenant)``
    makes a well-formed request naming ``tenant``; ``serve(auth, tmp_path)`` runs the service (with auth
    already running) and yields its address. The matrix calls the mesh path; ``mesh_only`` lists what the tenant
    path refuses to everyone (tests/mesh/test_tenant_path.py calls each of them there).
    """

    full_name: str
    descriptor: ServiceDescriptor
    expected: dict[str, frozenset[str]]
    tenant_free: set[str]
    build_request: Callable[[str, str], Any]
    serve: Callable[[Any, Path], AbstractAsyncContextManager[str]]
    #: RPCs only mesh services call: refused on the tenant path whoever asks (the rules' ``mesh_only``).
    mesh_only: frozenset[str] = frozenset()
    #: RPCs that call another service which ``serve`` deliberately does not run: an allowed caller gets UNAVAILABLE
    #: for the refused connection to it (proof the call passed this service's authorization), never anything else.
    reach_absent_services: frozenset[str] = frozenset()
