"""The bearer authenticator: whatever the Authorization header holds, the answer is a
principal, None (no bearer credentials) or an AuthError, never another exception."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.authn.chain import AuthChain, BearerJWT
from proxy.authn.jwt import IssuerConfig
from proxy.authn.principal import AuthError

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
