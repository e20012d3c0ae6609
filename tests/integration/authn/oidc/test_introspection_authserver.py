"""Opaque tokens checked at a real authlib RFC 7662 introspection endpoint."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from lineage_sidecar.config import IdentityHeadersConfig
from proxy.authn.chain import AuthChain, OpaqueBearer
from proxy.authn.introspection import IntrospectionConfig, TokenIntrospector
from proxy.authn.principal import AuthError
from proxy.authn.tokencache import VerifiedTokenCache
from proxy.gate import Admission, Gate, Refusal
from tests.integration.authn.oidc.authserver import (
    RESOURCE_CLIENT_ID,
    RESOURCE_CLIENT_SECRET,
    OidcProvider,
)

MakeIntrospector = Callable[..., Awaitable[TokenIntrospector]]


class Clock:
    """Wall-clock time that the test moves forward; the server keeps real time."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def make_introspector(
    authserver: OidcProvider,
) -> AsyncIterator[MakeIntrospector]:
    made: list[TokenIntrospector] = []

    async def make(
        *, cache: VerifiedTokenCache | None = None, clock: Clock | None = None, **fields: Any
    ) -> TokenIntrospector:
        settings: dict[str, Any] = {
            "issuer": authserver.issuer,
            "endpoint": authserver.issuer + "/introspect",
            "client_id": RESOURCE_CLIENT_ID,
            "client_secret": RESOURCE_CLIENT_SECRET,
            "audiences": (RESOURCE_CLIENT_ID,),
            "roles_claim": "roles",
            "allow_insecure_http": True,
        } | fields
        config = msgspec.convert(settings, IntrospectionConfig)
        extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
        introspector = TokenIntrospector(config, cache=cache, **extra)
        await introspector.start()
        made.append(introspector)
        return introspector

    yield make
    for introspector in made:
        await introspector.close()


async def refused(introspector: TokenIntrospector, token: str) -> AuthError:
    with pytest.raises(AuthError) as raised:
        await introspector.authenticate(token)
    return raised.value


async def test_active_token_authenticates_and_is_cached(
    authserver: OidcProvider, make_introspector: MakeIntrospector
) -> None:
    authserver.register_web_client("https://unused.example/cb")
    token = authserver.issue_access_token(scope="read")
    introspector = await make_introspector(required_scopes=("read",))
    principal = await introspector.authenticate(token)
    assert (principal.id, principal.issuer, principal.auth_method) == (
        "alice",
        authserver.issuer,
        "introspection",
    )
    assert principal.roles == ("analyst",)
    assert principal.scopes == ("read",)
    assert await introspector.authenticate(token) == principal
    assert authserver.introspections == 1


async def test_unknown_and_revoked_tokens_are_401(
    authserver: OidcProvider, make_introspector: MakeIntrospector
) -> None:
    authserver.register_web_client("https://unused.example/cb")
    introspector = await make_introspector()
    assert (await refused(introspector, "never-issued")).reason == "token_inactive"
    token = authserver.issue_access_token()
    authserver.tokens[token].revoked = True
    error = await refused(introspector, token)
    assert (error.reason, error.status) == ("token_inactive", 401)


async def test_token_of_another_issuer_is_401(
    authserver: OidcProvider, make_introspector: MakeIntrospector
) -> None:
    authserver.register_web_client("https://unused.example/cb")
    token = authserver.issue_access_token()
    introspector = await make_introspector(issuer="https://other-issuer.example")
    assert (await refused(introspector, token)).reason == "wrong_issuer"


async def test_a_cache_entry_never_satisfies_another_audience_or_scope_set(
    authserver: OidcProvider, make_introspector: MakeIntrospector
) -> None:
    authserver.register_web_client("https://unused.example/cb")
    token = authserver.issue_access_token(scope="read")
    shared = VerifiedTokenCache()
    lenient = await make_introspector(cache=shared)
    assert (await lenient.authenticate(token)).id == "alice"
    other_audience = await make_introspector(cache=shared, audiences=("billing-api",))
    assert (await refused(other_audience, token)).reason == "wrong_audience"
    more_scope = await make_introspector(cache=shared, required_scopes=("read", "write"))
    error = await refused(more_scope, token)
    assert (error.reason, error.status) == ("insufficient_scope", 403)
    # Each refusal came from the endpoint, not from the lenient configuration's entry.
    assert authserver.introspections == 3
    assert await lenient.authenticate(token) is not None
    assert authserver.introspections == 3


async def test_cache_is_bounded_by_ttl_and_by_exp(
    authserver: OidcProvider, make_introspector: MakeIntrospector
) -> None:
    authserver.register_web_client("https://unused.example/cb")
    clock = Clock()
    introspector = await make_introspector(clock=clock, cache_ttl=30)
    token = authserver.issue_access_token(expires_in=100)
    await introspector.authenticate(token)
    clock.now += 29
    await introspector.authenticate(token)
    assert authserver.introspections == 1
    clock.now += 2  # past the cache TTL: asked again
    await introspector.authenticate(token)
    assert authserver.introspections == 2
    short = authserver.issue_access_token(expires_in=45)  # 14 s left on our clock
    await introspector.authenticate(short)
    clock.now += 15  # within the cache TTL, but past exp
    assert (await refused(introspector, short)).reason == "token_expired"
    assert authserver.introspections == 4


async def test_endpoint_failures_fail_closed_with_503(
    authserver: OidcProvider, make_introspector: MakeIntrospector
) -> None:
    authserver.register_web_client("https://unused.example/cb")
    token = authserver.issue_access_token()
    wrong_credentials = await make_introspector(client_secret="not-the-secret")
    assert (await refused(wrong_credentials, token)).status == 503
    introspector = await make_introspector()
    authserver.down = True
    error = await refused(introspector, token)
    assert (error.reason, error.status) == ("introspection_unavailable", 503)
    await authserver.close()
    assert (await refused(introspector, token)).status == 503


async def gate_refusal(gate: Gate, token: str) -> Refusal:
    headers = CIMultiDict({"Host": "sales.test", "Authorization": "Bearer " + token})
    request = make_mocked_request("GET", "/sales/orders.json", headers=headers)

    async def admit() -> Admission:
        answer = gate.admit(request, "rid-1")
        return answer if isinstance(answer, Admission) else await answer

    with pytest.raises(Refusal) as raised:
        await admit()
    return raised.value


async def test_gate_tells_a_missing_scope_from_refused_or_undecided_credentials(
    authserver: OidcProvider, make_introspector: MakeIntrospector
) -> None:
    authserver.register_web_client("https://unused.example/cb")
    introspector = await make_introspector(required_scopes=("write",))
    gate = Gate(
        auth=AuthChain([OpaqueBearer([introspector])]),
        policy=None,
        audit=None,
        identity=IdentityHeadersConfig(),
    )
    scoped = await gate_refusal(gate, authserver.issue_access_token(scope="read"))
    assert (scoped.status, scoped.error) == (403, "insufficient_scope")
    assert scoped.message == "the credentials lack a scope this route requires"
    assert scoped.headers == {
        "WWW-Authenticate": 'Bearer realm="lineage-sidecar", error="insufficient_scope"'
    }
    inactive = await gate_refusal(gate, "never-issued")
    assert (inactive.status, inactive.message) == (401, "the credentials were refused")
    assert 'error="invalid_token"' in inactive.headers["WWW-Authenticate"]
    authserver.down = True
    undecided = await gate_refusal(gate, authserver.issue_access_token(scope="write"))
    assert (undecided.status, undecided.message) == (503, "authentication cannot be decided now")
    assert "WWW-Authenticate" not in undecided.headers


async def test_malformed_tokens_are_refused_without_a_call(
    authserver: OidcProvider, make_introspector: MakeIntrospector
) -> None:
    introspector = await make_introspector()
    for token in ("", "two words", "a\r\nb", "x" * 1_000_000, "tök"):
        assert (await refused(introspector, token)).status == 401
    assert authserver.introspections == 0


async def test_concurrent_requests_share_one_introspection(
    authserver: OidcProvider, make_introspector: MakeIntrospector
) -> None:
    authserver.register_web_client("https://unused.example/cb")
    token = authserver.issue_access_token()
    introspector = await make_introspector()
    principals = await asyncio.gather(*(introspector.authenticate(token) for _ in range(10)))
    assert {principal.id for principal in principals} == {"alice"}
    assert authserver.introspections == 1
