"""The authorization matrix: every RPC of every service that has RPCs x every role x own / other tenant,
called through the real servers, against expectation tables written out by hand in ``tests/<svc>/matrix.py``.

A new RPC fails this test until it gets a row there (and an entry in its service's permission table), so no
RPC can ship without a decision about who may call it.
"""

from __future__ import annotations

import importlib
import itertools
from pathlib import Path

import grpc
import pytest

from services.mesh.authz import PermissionTable, Scope
from services.mesh.config import SERVICE_NAMES
from tests.conftest import RunningAuth
from tests.matrix_support import PASSWORD, ROLES, USERS, ServiceUnderTest

#: Answers that mean an allowed call was not served: refused, unauthenticated, or failed where a refusal could hide.
NOT_SERVED = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def _permission_tables() -> dict[str, PermissionTable]:
    """The permission table of every service that serves RPCs (a service's permissions.py module)."""
    tables = {}
    for name in SERVICE_NAMES:
        try:
            module = importlib.import_module(f"services.{name}.permissions")
        except ModuleNotFoundError:
            continue
        tables[name] = module.PERMISSIONS
    return tables


def _under_test() -> dict[str, ServiceUnderTest]:
    found = {}
    for name in _permission_tables():
        module = importlib.import_module(f"tests.{name}.matrix")
        found[name] = module.UNDER_TEST
    return found


def test_every_rpc_has_a_permission_rule_and_an_expectation() -> None:
    tables = _permission_tables()
    assert "auth" in tables
    served = {method.strip("/") for table in tables.values() for method, _ in table.items()}
    expected = {f"{s.full_name}/{rpc}" for s in _under_test().values() for rpc in s.expected}
    described = {f"{s.full_name}/{m.name}" for s in _under_test().values() for m in s.descriptor.methods}
    assert served == expected == described, "add the new RPC to tests/<svc>/matrix.py and its permission table"


def test_mesh_only_rpcs_are_the_decided_ones() -> None:
    """Which RPCs tenants can never reach is decided by hand here, as the matrix decides who may call the rest."""
    tables = _permission_tables()
    declared = {
        name: {m.rsplit("/", 1)[1] for m, rule in table.items() if rule.mesh_only} for name, table in tables.items()
    }
    assert declared == {name: set(s.mesh_only) for name, s in _under_test().items()}


def _served(service: str, rpc: str, code: grpc.StatusCode, message: str) -> bool:
    """Whether an allowed call was served: OK, or the domain's answer to the matrix's request (e.g. NOT_FOUND for a
    dataset no one uploaded), never a refusal or a failure that could hide one. Two answers are the domain's only
    where they cannot come from the mesh: UNAUTHENTICATED from a public RPC (it checks no bearer token, so it refused
    the credential the request carries, as the matrix's made-up ones must be), and UNAVAILABLE for a connection refused
    by a service the matrix does not run."""
    if code not in NOT_SERVED:
        return True
    if code == grpc.StatusCode.UNAUTHENTICATED:
        under_test = _under_test()[service]
        rule = _permission_tables()[service].rule(f"/{under_test.full_name}/{rpc}")
        return rule is not None and rule.scope == Scope.PUBLIC
    if code == grpc.StatusCode.UNAVAILABLE:
        return rpc in _under_test()[service].reach_absent_services and "Connection refused" in message
    return False


@pytest.fixture
async def principals(auth: RunningAuth) -> dict[str, str]:
    """Tokens of one user per tenant role in acme, plus the platform admin; globex has the same users."""
    admin_token = (await auth.client().login("platform", "admin", auth.admin_password)).access_token
    admin = auth.client(admin_token)
    tokens = {"platform-admin": admin_token}
    for tenant in ("acme", "globex"):
        await admin.create_tenant(tenant)
        for role, name in USERS.items():
            await admin.create_user(tenant, name, PASSWORD, [role])
    for role, name in USERS.items():
        tokens[role] = (await auth.client().login("acme", name, PASSWORD)).access_token
    return tokens


@pytest.mark.parametrize("service", sorted(_permission_tables()))
async def test_authorization_matrix(
    service: str, auth: RunningAuth, principals: dict[str, str], tmp_path: Path
) -> None:
    under_test = _under_test()[service]
    mismatches = []
    async with under_test.serve(auth, tmp_path) as address, grpc.aio.insecure_channel(address) as channel:
        for rpc, allowed_roles in under_test.expected.items():
            method = under_test.descriptor.methods_by_name[rpc]
            serialize = lambda m: m.SerializeToString()  # noqa: E731
            if method.client_streaming and method.server_streaming:
                call = channel.stream_stream(f"/{under_test.full_name}/{rpc}", request_serializer=serialize)
            elif method.client_streaming:
                call = channel.stream_unary(f"/{under_test.full_name}/{rpc}", request_serializer=serialize)
            elif method.server_streaming:
                call = channel.unary_stream(f"/{under_test.full_name}/{rpc}", request_serializer=serialize)
            else:
                call = channel.unary_unary(f"/{under_test.full_name}/{rpc}", request_serializer=serialize)
            for role, tenant in itertools.product(ROLES, ("acme", "globex")):
                request = under_test.build_request(rpc, tenant)
                metadata = (("authorization", f"Bearer {principals[role]}"),)
                try:
                    if method.client_streaming:
                        messages = request if isinstance(request, list) else [request]
                        result = call(iter(messages), metadata=metadata, timeout=10)
                    else:
                        result = call(request, metadata=metadata, timeout=10)
                    if method.server_streaming:
                        async for _ in result:
                            pass
                    else:
                        await result
                    code, message = grpc.StatusCode.OK, ""
                except grpc.aio.AioRpcError as error:
                    code, message = error.code(), error.details() or ""
                own = tenant == "acme" or role == "platform-admin" or rpc in under_test.tenant_free
                if own and role in allowed_roles:
                    if not _served(service, rpc, code, message):
                        mismatches.append(f"{rpc} as {role} on {tenant}: {code.name} {message!r}, expected served")
                elif code != grpc.StatusCode.PERMISSION_DENIED:
                    mismatches.append(f"{rpc} as {role} on {tenant}: {code.name} {message!r}, expected denied")
    assert not mismatches, "\n".join(mismatches)
