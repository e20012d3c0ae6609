"""VerifiedTokenCache: hits only for the same token under the same verifier, never past exp."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.authn.jwt import TrustedIssuers
from proxy.authn.principal import Principal
from proxy.authn.tokencache import TokenCache, VerifiedTokenCache
from tests.unit.proxy.authn.tokens import issuer_config

START = 1_700_000_000.0


class FakeClock:
    """A wall clock the test moves by hand (no sleeping, no timing assertions)."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def _principal(expires_at: float | None = START + 600, issuer: str = "https://a") -> Principal:
    return Principal(id="alice", issuer=issuer, auth_method="jwt", expires_at=expires_at)


def test_a_verified_token_is_served_until_its_expiry_and_not_after() -> None:
    clock = FakeClock()
    cache = VerifiedTokenCache(clock=clock, max_ttl=3600)
    cache.put("token", "scope", _principal(expires_at=START + 60))
    assert cache.get("token", "scope") == _principal(expires_at=START + 60)
    clock.now = START + 59.9
    assert cache.get("token", "scope") is not None
    clock.now = START + 60
    assert cache.get("token", "scope") is None
    assert len(cache) == 0


def test_entries_live_no_longer_than_max_ttl() -> None:
    clock = FakeClock()
    cache = VerifiedTokenCache(clock=clock, max_ttl=30)
    cache.put("token", "scope", _principal(expires_at=START + 3600))
    clock.now = START + 30
    assert cache.get("token", "scope") is None


def test_principals_without_expiry_or_already_expired_are_not_cached() -> None:
    cache = VerifiedTokenCache(clock=FakeClock())
    cache.put("a", "scope", _principal(expires_at=None))
    cache.put("b", "scope", _principal(expires_at=START - 1))
    assert len(cache) == 0


def test_another_scope_or_token_misses() -> None:
    cache = VerifiedTokenCache(clock=FakeClock())
    cache.put("token", "issuer-a", _principal())
    assert cache.get("token", "issuer-b") is None
    assert cache.get("token2", "issuer-a") is None
    assert cache.get("token", "issuer-a") is not None


def test_the_least_recently_used_entry_is_evicted_at_the_bound() -> None:
    cache = VerifiedTokenCache(max_entries=2, clock=FakeClock())
    cache.put("t1", "s", _principal())
    cache.put("t2", "s", _principal())
    assert cache.get("t1", "s") is not None  # t1 is now the most recent
    cache.put("t3", "s", _principal())
    assert cache.get("t2", "s") is None
    assert cache.get("t1", "s") is not None
    assert cache.get("t3", "s") is not None
    assert cache.stats().evictions == 1
    assert len(cache) == 2


def test_hits_and_misses_are_counted() -> None:
    cache = VerifiedTokenCache(clock=FakeClock())
    cache.get("t", "s")
    cache.put("t", "s", _principal())
    cache.get("t", "s")
    cache.get("t", "s")
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.size) == (2, 1, 1)


def test_the_in_process_cache_satisfies_the_protocol() -> None:
    cache: TokenCache = VerifiedTokenCache()
    cache.put("t", "s", _principal(expires_at=4_000_000_000.0))
    assert cache.get("t", "s") is not None


scopes = st.text(min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(token=st.text(max_size=60), scope_a=scopes, scope_b=scopes, other=st.text(max_size=60))
def test_an_entry_never_serves_another_scope_or_token(
    token: str, scope_a: str, scope_b: str, other: str
) -> None:
    cache = VerifiedTokenCache(clock=FakeClock())
    cache.put(token, scope_a, _principal(issuer=scope_a))
    if scope_b != scope_a:
        assert cache.get(token, scope_b) is None
    if other != token:
        assert cache.get(other, scope_a) is None
    assert cache.get(token, scope_a) == _principal(issuer=scope_a)


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz:/.-", min_size=1, max_size=20)


@settings(max_examples=60, deadline=None)
@given(issuer_a=names, issuer_b=names, audience_a=names, audience_b=names)
def test_configs_that_differ_in_issuer_or_audience_never_share_cache_entries(
    issuer_a: str, issuer_b: str, audience_a: str, audience_b: str
) -> None:
    verifier_a = TrustedIssuers([issuer_config(issuer=issuer_a, audiences=[audience_a])])
    verifier_b = TrustedIssuers([issuer_config(issuer=issuer_b, audiences=[audience_b])])
    cache = VerifiedTokenCache(clock=FakeClock())
    cache.put("token", verifier_a.fingerprint, _principal(issuer=issuer_a))
    found = cache.get("token", verifier_b.fingerprint)
    if (issuer_a, audience_a) == (issuer_b, audience_b):
        assert found == _principal(issuer=issuer_a)
    else:
        assert found is None


@settings(max_examples=200, deadline=None)
@given(head_a=st.text(max_size=40), head_b=st.text(max_size=40), tail=st.text(max_size=40))
def test_tokens_that_end_alike_never_answer_for_each_other(
    head_a: str, head_b: str, tail: str
) -> None:
    # Entries are found by the token's end: a token that shares it must still miss.
    first, second = head_a + tail, head_b + tail
    cache = VerifiedTokenCache(clock=FakeClock())
    cache.put(first, "s", _principal(issuer="https://first"))
    if second != first:
        assert cache.get(second, "s") is None
        cache.put(second, "s", _principal(issuer="https://second"))
        assert cache.get(second, "s") == _principal(issuer="https://second")
        found = cache.get(first, "s")
        assert found is None or found == _principal(issuer="https://first")
    else:
        assert cache.get(first, "s") == _principal(issuer="https://first")
