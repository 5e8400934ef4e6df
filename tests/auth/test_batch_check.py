"""BatchCheckPermission through the real auth server: bounded in size, and a maximal batch does not stall the single
CheckPermission calls every other service depends on (auth's event loop keeps serving them between slices)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
from tests.conftest import RunningAuth


async def test_a_batch_over_1000_checks_is_invalid_argument(auth: RunningAuth) -> None:
    token = (await auth.client().login("platform", "admin", auth.admin_password)).access_token
    admin = auth.client(token)
    check = pb.PermissionCheck(tenant="platform", resource="tenants", action="write")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin.stub.BatchCheckPermission(pb.BatchCheckPermissionRequest(checks=[check] * 100_000))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "checks holds 100000 items; at most 1000 are allowed"
    await admin.close()


async def test_a_maximal_batch_does_not_stall_concurrent_single_checks(auth: RunningAuth) -> None:
    """1,000 distinct checks (none memoized, each a Casbin evaluation) run while another caller keeps asking single
    questions. Before evaluation was sliced, the batch held auth's event loop from start to end: a single check
    sent meanwhile waited for the whole batch. Now none waits more than a small part of it."""
    anonymous = auth.client()
    token = (await anonymous.login("platform", "admin", auth.admin_password)).access_token
    admin = auth.client(token)
    single = pb.CheckPermissionRequest(check=pb.PermissionCheck(tenant="platform", resource="tenants", action="read"))
    for _ in range(20):  # warm: token verified and decision memoized
        assert (await admin.stub.CheckPermission(single)).allowed
    checks = [
        pb.PermissionCheck(subject=f"user:t{i % 13}/u{i}", tenant=f"t{i % 13}", resource="datasets", action="read")
        for i in range(1000)
    ]
    started = time.perf_counter()
    batch = asyncio.ensure_future(admin.stub.BatchCheckPermission(pb.BatchCheckPermissionRequest(checks=checks)))
    waits: list[float] = []
    while not batch.done():
        sent = time.perf_counter()
        assert (await admin.stub.CheckPermission(single)).allowed
        waits.append(time.perf_counter() - sent)
    decisions = list((await batch).allowed)
    batch_seconds = time.perf_counter() - started
    assert decisions == [False] * 1000
    assert len(waits) >= 5, f"only {len(waits)} single checks were answered during a {batch_seconds:.3f} s batch"
    assert max(waits) < batch_seconds / 4, (
        f"a single check waited {max(waits):.3f} s during a {batch_seconds:.3f} s batch ({len(waits)} answered)"
    )
    await admin.close()
