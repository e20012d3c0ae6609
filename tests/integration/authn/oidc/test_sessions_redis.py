"""Sessions in the real Redis: what is stored, lifetimes, logout everywhere, fail closed."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.authn.principal import AuthError, Principal
from proxy.authn.sessions import (
    RedisSessionStore,
    SessionAuthenticator,
    SessionConfig,
    SessionManager,
    sign_session_id,
)
from tests.integration.authn.oidc.authserver import bound_socket

KEY = b"s" * 32
ALICE = Principal(id="alice", issuer="https://idp.example", auth_method="session")
BOB = Principal(id="bob", issuer="https://idp.example", auth_method="session")


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def manager(redis: Redis, prefix: str, clock: Clock) -> SessionManager:
    config = SessionConfig(
        idle_timeout=600, absolute_timeout=3600, touch_interval=60, key_prefix=prefix
    )
    return SessionManager(config, (KEY,), RedisSessionStore(redis, key_prefix=prefix), clock=clock)


def header(sessions: SessionManager, value: str) -> str:
    return f"{sessions.config.cookie_name}={value}"


async def test_redis_holds_a_hash_of_the_id_with_an_idle_expiry(
    redis: Redis, key_prefix: str
) -> None:
    sessions = manager(redis, key_prefix, Clock())
    value = await sessions.create(ALICE)
    session_id = value.split(".")[0]
    keys = [key.decode() async for key in redis.scan_iter(match=key_prefix + "*")]
    assert sorted(key.removeprefix(key_prefix)[:2] for key in keys) == ["p:", "s:"]
    assert all(session_id not in key and value not in key for key in keys)
    session_key = key_prefix + "s:" + hashlib.sha256(session_id.encode()).hexdigest()
    assert 0 < await redis.pttl(session_key) <= 600_000
    principal = await SessionAuthenticator(sessions).authenticate(header(sessions, value))
    assert principal is not None
    assert principal.id == "alice"


async def test_timeouts_are_enforced_and_expired_records_deleted(
    redis: Redis, key_prefix: str
) -> None:
    clock = Clock()
    sessions = manager(redis, key_prefix, clock)
    authenticator = SessionAuthenticator(sessions)
    idle = await sessions.create(ALICE)
    clock.now += 601
    assert await authenticator.authenticate(header(sessions, idle)) is None
    assert [key async for key in redis.scan_iter(match=key_prefix + "s:*")] == []

    active = await sessions.create(ALICE)
    for _ in range(11):  # 11 * 300 s = 3300 s, each within the idle timeout
        clock.now += 300
        assert await authenticator.authenticate(header(sessions, active)) is not None
    clock.now += 300  # 3600 s after login
    assert await authenticator.authenticate(header(sessions, active)) is None


async def test_a_read_racing_a_logout_does_not_revive_the_session(
    redis: Redis, key_prefix: str
) -> None:
    clock = Clock()
    sessions = manager(redis, key_prefix, clock)
    value = await sessions.create(ALICE)
    session_id = sessions.session_id_from(header(sessions, value))
    assert session_id is not None
    key = hashlib.sha256(session_id.encode()).hexdigest()
    await sessions.end(session_id)
    await sessions.store.update(key, b"late write of last_seen", 600)
    assert await sessions.store.load(key) is None


async def test_logout_everywhere_ends_all_sessions_of_the_principal_only(
    redis: Redis, key_prefix: str
) -> None:
    sessions = manager(redis, key_prefix, Clock())
    authenticator = SessionAuthenticator(sessions)
    alices = [await sessions.create(ALICE) for _ in range(3)]
    bobs = await sessions.create(BOB)
    assert await sessions.end_everywhere(ALICE) == 3
    for value in alices:
        assert await authenticator.authenticate(header(sessions, value)) is None
    assert await authenticator.authenticate(header(sessions, bobs)) is not None
    assert await sessions.end_everywhere(ALICE) == 0


async def test_pending_state_is_claimed_exactly_once_under_concurrency(
    redis: Redis, key_prefix: str
) -> None:
    store = RedisSessionStore(redis, key_prefix=key_prefix)
    await store.stash("state", b"pending", ttl=60)
    claims = await asyncio.gather(*(store.claim("state") for _ in range(20)))
    assert claims.count(b"pending") == 1
    assert claims.count(None) == 19


async def test_an_unreadable_record_is_no_session(redis: Redis, key_prefix: str) -> None:
    sessions = manager(redis, key_prefix, Clock())
    value = await sessions.create(ALICE)
    async for key in redis.scan_iter(match=key_prefix + "s:*"):
        await redis.set(key, b"\xc1 not msgpack")
    assert await SessionAuthenticator(sessions).authenticate(header(sessions, value)) is None


async def test_redis_down_fails_closed_with_503() -> None:
    sock = bound_socket()  # a free port, closed again: connections are refused
    port = sock.getsockname()[1]
    sock.close()
    # No retries: redis-py would otherwise back off for seconds before giving up.
    redis = Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    sessions = manager(redis, "unused:", Clock())
    value = "A" * 43
    cookie = header(sessions, sign_session_id(KEY, value))
    try:
        with pytest.raises(AuthError) as raised:
            await SessionAuthenticator(sessions).authenticate(cookie)
        assert raised.value.status == 503
        with pytest.raises(AuthError):
            await sessions.create(ALICE)
        # A forged cookie is refused before any store call, so it is None, not 503.
        assert await SessionAuthenticator(sessions).authenticate(header(sessions, "x.y")) is None
    finally:
        await redis.aclose()
