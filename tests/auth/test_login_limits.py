"""Login and API-key exchange limits: per account and per client address, with doubling blocks refused before any
hash is computed (RESOURCE_EXHAUSTED with a RetryInfo hint), and an audit log that does not grow with a guessing
run. Through the real auth server; the doubling itself on the throttle with an injected clock."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from services.auth.client import AuthClient
from services.auth.core.limits import LoginLimits, LoginThrottle
from services.gen.aidc.auth.v1 import auth_service_pb2 as pb
from services.gen.aidc.auth.v1 import auth_service_pb2_grpc
from services.mesh.errors import STATUS_DETAILS_KEY, QuotaExceeded, Unauthenticated
from services.mesh.peers import client_address, parse_proxies
from tests.conftest import RunningAuth

PASSWORD = "correct horse battery"
WRONG = "not the password at all"


async def _tenant_with_users(auth: RunningAuth, *names: str) -> AuthClient:
    admin = auth.client((await auth.client().login("platform", "admin", auth.admin_password)).access_token)
    await admin.create_tenant("acme")
    for name in names:
        await admin.create_user("acme", name, PASSWORD, ["developer"])
    return admin


def _retry_info(error: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay of a RESOURCE_EXHAUSTED status, read as any gRPC client would."""
    [details] = [v for k, v in error.trailing_metadata() or () if k == STATUS_DETAILS_KEY]
    status = status_pb2.Status.FromString(details)
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9


async def _login_status(auth: RunningAuth, name: str, password: str) -> grpc.aio.AioRpcError | None:
    async with grpc.aio.insecure_channel(auth.address) as channel:
        try:
            await auth_service_pb2_grpc.AuthServiceStub(channel).Login(
                pb.LoginRequest(tenant="acme", name=name, password=password), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return error
    return None


@pytest.mark.auth_env(AIDC_AUTH_LOGIN_FIRST_BLOCK_SECONDS="60")
async def test_failed_logins_block_the_account_before_any_hash_with_a_retry_hint(auth: RunningAuth) -> None:
    admin = await _tenant_with_users(auth, "alice", "bob")
    for _ in range(6):  # five free failures, then the sixth starts a block
        with pytest.raises(Unauthenticated):
            await auth.client().login("acme", "alice", WRONG)
    failures = [e for e in await admin.list_audit_events("acme", 1000) if e.action == "login.failure"]
    assert len(failures) == 6 and '"blocked_seconds": 60.0' in failures[0].details_json

    # Blocked: even the right password is refused, before it is hashed, with the standard retry hint.
    refused = await _login_status(auth, "alice", PASSWORD)
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry in" in (refused.details() or "")
    assert 50 < _retry_info(refused) <= 60
    with pytest.raises(QuotaExceeded) as typed:  # the typed client carries the hint too
        await auth.client().login("acme", "alice", PASSWORD)
    assert typed.value.retry_after_seconds is not None and 50 < typed.value.retry_after_seconds <= 60

    # A guessing run against the blocked account writes nothing more to the audit log.
    for _ in range(10):
        with pytest.raises(QuotaExceeded):
            await auth.client().login("acme", "alice", WRONG)
    after = [e for e in await admin.list_audit_events("acme", 1000) if e.action == "login.failure"]
    assert len(after) == 6

    # Other accounts from the same address are not blocked (the address has 6 failures, under its limit of 20).
    assert (await auth.client().login("acme", "bob", PASSWORD)).access_token


@pytest.mark.auth_env(AIDC_AUTH_LOGIN_SOURCE_FREE_FAILURES="4", AIDC_AUTH_LOGIN_FIRST_BLOCK_SECONDS="60")
async def test_failures_spread_over_accounts_block_the_address(auth: RunningAuth) -> None:
    admin = await _tenant_with_users(auth, "alice")
    for name in ("u1", "u2", "u3", "u4", "u5"):  # one failure each: no account is near its limit
        with pytest.raises(Unauthenticated):
            await auth.client().login("acme", name, WRONG)
    with pytest.raises(QuotaExceeded, match="this address"):
        await auth.client().login("acme", "alice", PASSWORD)
    # Names no account has are not written to the audit log; the block on the address is, once.
    events = await admin.list_audit_events("", 1000)
    assert not [e for e in events if e.action == "login.failure"]
    assert [e.target for e in events if e.action == "login.throttled"] == ["source:127.0.0.1"]


@pytest.mark.auth_env(AIDC_AUTH_LOGIN_FIRST_BLOCK_SECONDS="60")
async def test_failed_api_key_exchanges_block_that_key(auth: RunningAuth) -> None:
    await _tenant_with_users(auth, "alice")
    alice = auth.client((await auth.client().login("acme", "alice", PASSWORD)).access_token)
    key = await alice.create_api_key("acme", description="ci")
    other = await alice.create_api_key("acme", description="other")
    guess = key.secret[: -len("guess")] + "guess"
    for _ in range(6):
        with pytest.raises(Unauthenticated):
            await auth.client().exchange_api_key(guess)
    with pytest.raises(QuotaExceeded, match="this account"):
        await auth.client().exchange_api_key(key.secret)
    assert (await auth.client().exchange_api_key(other.secret)).access_token


@pytest.mark.auth_env(AIDC_AUTH_LOGIN_RATE_PER_SECOND="0.01", AIDC_AUTH_LOGIN_BURST="4")
async def test_attempts_from_one_address_are_rate_limited_even_when_they_succeed(auth: RunningAuth) -> None:
    # The fixture's first admin login took one attempt of the burst; these take the other three.
    await _tenant_with_users(auth, "alice")  # another admin login
    for _ in range(2):
        assert (await auth.client().login("acme", "alice", PASSWORD)).access_token
    refused = await _login_status(auth, "alice", PASSWORD)
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 90 < _retry_info(refused) <= 100  # one attempt per 100 s


def test_blocks_double_and_are_forgotten_and_success_clears_the_account() -> None:
    now = [1000.0]
    limits = LoginLimits(account_free_failures=2, source_free_failures=100, max_block_seconds=8.0)
    throttle = LoginThrottle(limits, clock=lambda: now[0])

    def fail() -> float:
        throttle.admit("10.0.0.1", "alice")
        blocks = throttle.failed("10.0.0.1", "alice")
        return blocks[0].seconds if blocks else 0.0

    assert [fail(), fail()] == [0.0, 0.0]
    seconds = []
    for _ in range(5):
        seconds.append(fail())
        with pytest.raises(QuotaExceeded) as blocked:
            throttle.admit("10.0.0.1", "alice")
        assert blocked.value.retry_after_seconds == pytest.approx(seconds[-1])
        now[0] += seconds[-1]
    assert seconds == [1.0, 2.0, 4.0, 8.0, 8.0]  # doubling up to the maximum
    throttle.admit("10.0.0.2", "bob")  # others are not affected
    throttle.succeeded("alice")
    assert [fail(), fail(), fail()] == [0.0, 0.0, 1.0]  # a success starts the streak over
    now[0] += limits.forget_after_seconds + 1
    assert fail() == 0.0  # and so does an hour without failures


def test_the_client_address_behind_a_trusted_proxy() -> None:
    proxies = parse_proxies("10.1.0.0/16, 192.168.1.7")
    forwarded = [("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.1.2.3")]
    # The right-most address a trusted proxy did not add; what the client itself put further left is ignored.
    assert client_address("ipv4:10.1.0.5:4431", forwarded, proxies) == "203.0.113.9"
    assert client_address("ipv4:192.168.1.7:1", [("x-forwarded-for", "198.51.100.4")], proxies) == "198.51.100.4"
    # A peer that is not a trusted proxy is the client, whatever it claims.
    assert client_address("ipv4:203.0.113.50:999", forwarded, proxies) == "203.0.113.50"
    assert client_address("ipv6:[2001:db8::1]:443", forwarded) == "2001:db8::1"
    assert client_address("ipv4:10.1.0.5:4431", [], proxies) == "10.1.0.5"
