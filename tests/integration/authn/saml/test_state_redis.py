"""`RedisSamlStore` against the real Redis: single use under concurrency, expiry, outage."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.authn.principal import AuthError
from proxy.authn.saml.state import RedisSamlStore


async def test_request_taken_once_under_concurrency(redis_store: RedisSamlStore) -> None:
    await redis_store.remember_request("_r", "/back", 60)
    assert await redis_store.peek_request("_r") == "/back"
    results = await asyncio.gather(*(redis_store.take_request("_r") for _ in range(20)))
    assert sorted(results, key=str) == ["/back"] + [None] * 19


async def test_assertion_first_use_under_concurrency(redis_store: RedisSamlStore) -> None:
    until = time.time() + 60
    results = await asyncio.gather(*(redis_store.first_use("_a", until) for _ in range(20)))
    assert results.count(True) == 1


async def test_entries_expire_with_redis_ttl(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    prefix = f"test:saml:{secrets.token_hex(8)}:"
    store = RedisSamlStore(redis, key_prefix=prefix)
    try:
        await store.remember_request("_r", "/", 60)
        # An assertion already past its validity is still remembered for a moment.
        assert await store.first_use("_a", until=time.time() - 5)
        assert 0 < await redis.ttl(f"{prefix}req:_r") <= 60
        assert 0 < await redis.ttl(f"{prefix}assertion:_a") <= 1
        assert not await store.first_use("_a", until=time.time() + 60)
    finally:
        await redis.delete(f"{prefix}req:_r", f"{prefix}assertion:_a")
        await redis.aclose()


async def test_redis_unreachable_fails_closed() -> None:
    redis = Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))
    store = RedisSamlStore(redis)
    try:
        for call in (store.peek_request("_r"), store.first_use("_a", time.time() + 5)):
            with pytest.raises(AuthError) as refused:
                await call
            assert refused.value.status == 503
    finally:
        await redis.aclose()
