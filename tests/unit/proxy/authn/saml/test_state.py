"""The in-process SAML state: single use of request ids, replay cache, bounded size."""

from __future__ import annotations

import pytest

from proxy.authn.principal import AuthError
from proxy.authn.saml.state import InProcessSamlStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_request_taken_once() -> None:
    store = InProcessSamlStore()
    await store.remember_request("_r", "/back", 60)
    assert await store.peek_request("_r") == "/back"
    assert await store.take_request("_r") == "/back"
    assert await store.take_request("_r") is None
    assert await store.peek_request("_r") is None


async def test_request_expires() -> None:
    clock = Clock()
    store = InProcessSamlStore(clock=clock)
    await store.remember_request("_r", "/back", 60)
    clock.now += 60
    assert await store.peek_request("_r") is None
    assert await store.take_request("_r") is None


async def test_unknown_request() -> None:
    assert await InProcessSamlStore().take_request("_never") is None


async def test_assertion_first_use_only_until_expiry() -> None:
    clock = Clock()
    store = InProcessSamlStore(clock=clock)
    assert await store.first_use("_a", until=clock.now + 10)
    assert not await store.first_use("_a", until=clock.now + 10)
    clock.now += 11
    assert await store.first_use("_a", until=clock.now + 10)


async def test_full_store_drops_expired_then_fails_closed() -> None:
    clock = Clock()
    store = InProcessSamlStore(max_entries=2, clock=clock)
    await store.remember_request("_r1", "/", 5)
    assert await store.first_use("_a1", until=clock.now + 100)
    clock.now += 10  # _r1 expired: room for one more
    await store.remember_request("_r2", "/", 60)
    with pytest.raises(AuthError) as refused:
        await store.remember_request("_r3", "/", 60)
    assert refused.value.status == 503
    # Live entries were not forgotten to make room: the replay is still caught.
    assert not await store.first_use("_a1", until=clock.now + 100)
