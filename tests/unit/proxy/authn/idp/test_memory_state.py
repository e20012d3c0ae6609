"""The in-process state (one worker without Redis): same rotation and limit promises."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.authn.idp.config import LoginRateLimitConfig
from proxy.authn.idp.ratelimit import MemoryLoginRateLimiter
from proxy.authn.idp.refresh import MemoryRefreshStore, Refuse, Reuse, Rotated

BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def store(clock: Clock) -> MemoryRefreshStore:
    return MemoryRefreshStore(idle_ttl=100, absolute_ttl=250, access_ttl=60, clock=clock)


async def test_rotation_reuse_and_revocation() -> None:
    clock = Clock()
    state = store(clock)
    family, first = await state.start_family("alice")
    second = await state.rotate(first)
    assert isinstance(second, Rotated)
    assert second.family == family
    assert not await state.is_family_revoked(family)
    assert await state.rotate(first) == Reuse(family=family, subject="alice")
    assert await state.is_family_revoked(family)
    # Revocation deleted the live token too.
    assert await state.rotate(second.refresh_token) == Refuse(reason="unknown_token")
    # The revocation mark outlives the family's access tokens, then goes.
    clock.now += 60 + 61
    assert not await state.is_family_revoked(family)


async def test_idle_and_absolute_expiry() -> None:
    clock = Clock()
    state = store(clock)
    _, token = await state.start_family("alice")
    clock.now += 101
    assert await state.rotate(token) == Refuse(reason="expired")
    _, token = await state.start_family("alice")
    for _ in range(2):
        clock.now += 90
        outcome = await state.rotate(token)
        assert isinstance(outcome, Rotated)
        token = outcome.refresh_token
    clock.now += 90  # 270 s after login: past the 250 s absolute lifetime
    assert await state.rotate(token) == Refuse(reason="expired")


@settings(max_examples=100, deadline=None)
@given(position=st.integers(0, 47), replacement=st.sampled_from(BASE64URL))
async def test_a_tampered_token_never_refreshes_nor_harms_the_session(
    position: int, replacement: str
) -> None:
    state = store(Clock())
    family, token = await state.start_family("alice")
    tampered = token[:position] + replacement + token[position + 1 :]
    if tampered != token:
        assert await state.rotate(tampered) == Refuse(reason="unknown_token")
        assert await state.lookup(tampered) is None
    assert not await state.is_family_revoked(family)
    assert isinstance(await state.rotate(token), Rotated)


async def test_memory_rate_limit_windows_slide() -> None:
    clock = Clock()
    limiter = MemoryLoginRateLimiter(
        LoginRateLimitConfig(per_user=2, per_address=3, window=60), clock=clock
    )
    assert await limiter.hit("alice", "10.0.0.1") == 0
    clock.now += 10
    assert await limiter.hit("alice", "10.0.0.1") == 0
    assert await limiter.hit("alice", "10.0.0.1") == 50
    assert await limiter.hit("bob", "10.0.0.1") == 0
    assert await limiter.hit("carol", "10.0.0.1") == 50
    assert await limiter.hit("carol", "10.0.0.2") == 0
    clock.now += 50
    assert await limiter.hit("alice", "10.0.0.1") == 0
