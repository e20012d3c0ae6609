"""The bearer authenticator: whatever the Authorization header holds, the answer is a
principal, None (no bearer credentials) or an AuthError, never another exception."""

from __future__ import annotations

import asyncio
import time

import jwt as pyjwt
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.authn.chain import AuthChain, BearerJWT
from proxy.authn.jwt import IssuerConfig
from proxy.authn.principal import AuthError, Principal

ISSUER = IssuerConfig(
    issuer="https://idp.example",
    audiences=("api",),
    shared_secret="s" * 48,
)


def authenticate(value: str) -> object:
    async def run() -> object:
        bearer = BearerJWT([ISSUER], cache_entries=100)
        try:
            return await AuthChain([bearer]).authenticate(CIMultiDict({"Authorization": value}))
        except AuthError as exc:
            return exc
        finally:
            await bearer.close()

    return asyncio.run(run())


@given(st.text(max_size=200))
@settings(max_examples=150, deadline=None)
def test_any_header_value_is_refused_cleanly(value: str) -> None:
    result = authenticate(value)
    assert result is None or isinstance(result, AuthError)


@given(st.text(max_size=200))
@settings(max_examples=150, deadline=None)
def test_any_bearer_token_is_refused_cleanly(token: str) -> None:
    result = authenticate("Bearer " + token)
    assert isinstance(result, AuthError) or (result is None and not token.strip())


def test_surrogate_escaped_bytes_are_an_auth_error() -> None:
    result = authenticate("Bearer \udcff\udcfeabc")
    assert isinstance(result, AuthError)
    assert result.status == 401


def test_other_schemes_are_not_ours() -> None:
    assert authenticate("Basic dXNlcjpwYXNz") is None


SECRET_ISSUER = IssuerConfig(
    issuer="https://idp.example",
    audiences=("api",),
    shared_secret="s" * 48,
    algorithms=("HS256",),
)


def _token(subject: str, *, audience: str = "api", lifetime: int = 600) -> str:
    now = int(time.time())
    claims = {"iss": SECRET_ISSUER.issuer, "aud": audience, "sub": subject, "iat": now}
    claims["exp"] = now + lifetime
    return pyjwt.encode(claims, "s" * 48, algorithm="HS256")


def _both(chain: AuthChain, value: str) -> tuple[object, object]:
    """(the early answer, the full chain's answer) for one Authorization header."""
    headers = CIMultiDict({"Authorization": value})
    early = chain.cached(headers)

    async def full() -> object:
        try:
            return await chain.authenticate(headers)
        except AuthError as exc:
            return exc

    return early, asyncio.run(full())


def test_the_early_answer_is_a_cache_hit_of_the_same_header_only() -> None:
    bearer = BearerJWT([SECRET_ISSUER], cache_entries=100)
    chain = AuthChain([bearer])
    token = _token("alice")
    early, full = _both(chain, "Bearer " + token)
    assert early is None  # not verified yet: the full path verifies and caches it
    assert isinstance(full, Principal)
    assert full.id == "alice"
    early, again = _both(chain, "Bearer " + token)
    assert early == again == full
    # The cache is keyed by the header exactly as verified: another spelling of the same
    # token is verified once on its own, then answered early too.
    respelled = "bearer  " + token + " "
    early, again = _both(chain, respelled)
    assert early is None
    assert again == full
    assert _both(chain, respelled) == (full, full)
    # Another token of the same subject, a tampered one, another scheme: never early.
    assert (
        chain.cached(CIMultiDict({"Authorization": "Bearer " + _token("alice", lifetime=601)}))
        is None
    )
    assert chain.cached(CIMultiDict({"Authorization": "Bearer " + token[:-2]})) is None
    assert chain.cached(CIMultiDict({"Authorization": "Basic " + token})) is None
    assert chain.cached(CIMultiDict()) is None


def test_no_early_answer_when_the_cache_is_off_or_the_bearer_is_not_first() -> None:
    token = _token("bob")
    off = AuthChain([BearerJWT([SECRET_ISSUER], cache_entries=0)])
    _both(off, "Bearer " + token)
    assert off.cached(CIMultiDict({"Authorization": "Bearer " + token})) is None

    class Nobody:
        async def authenticate(self, headers: object) -> Principal | None:
            return None

    bearer = BearerJWT([SECRET_ISSUER], cache_entries=100)
    second = AuthChain([Nobody(), bearer])
    _both(second, "Bearer " + token)
    assert len(bearer.cache) == 1
    assert second.cached(CIMultiDict({"Authorization": "Bearer " + token})) is None


@given(
    st.lists(st.sampled_from(["alice", "bob", "carol"]), min_size=1, max_size=4),
    st.lists(st.text(max_size=40), max_size=4),
    st.sampled_from(["Bearer ", "bearer ", "BEARER  ", "Basic ", "Bearer", ""]),
)
@settings(max_examples=60, deadline=None)
def test_the_early_answer_never_differs_from_the_full_chain(
    subjects: list[str], junk: list[str], scheme: str
) -> None:
    bearer = BearerJWT([SECRET_ISSUER], cache_entries=100)
    chain = AuthChain([bearer])
    tokens = [_token(s) for s in subjects] + junk
    for value in [scheme + t for t in tokens] * 2:
        early, full = _both(chain, value)
        assert early is None or early == full
