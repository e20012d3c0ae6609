"""JwksCache against a real HTTP identity provider on loopback.

The provider is an aiohttp app serving an OIDC discovery document and a JWKS built with
authlib's `JsonWebKey`; its tokens are signed with `authlib.jose.jwt`, so signing and
verification are done by two independent JOSE implementations.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from proxy.authn.jwks import JwksCache
from proxy.authn.jwt import IssuerConfig, TrustedIssuers
from proxy.authn.principal import AuthError

with warnings.catch_warnings():
    # authlib.jose is deprecated in favour of joserfc, but it is a real, independent
    # issuer-side implementation. authlib.deprecate forces its warning to "always" on
    # import, so the filter to silence it goes in after that import.
    import authlib.deprecate  # noqa: F401

    warnings.simplefilter("ignore")
    from authlib.jose import JsonWebKey, KeySet, jwt

AUDIENCE = "data-api"


class ManualClock:
    """Monotonic time the test advances, to step over the refresh rate limit without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class IdentityProvider:
    """A minimal OIDC provider: discovery, JWKS, signed tokens, request counting."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.signing_keys: dict[str, Any] = {}
        self.published: list[Any] = []
        self.runner: web.AppRunner | None = None
        self.jwks_served = asyncio.Event()
        self.base_url = ""
        self.add_key("RSA", 2048, "rsa-1")
        self.add_key("EC", "P-256", "ec-1")
        private = dict(self.signing_keys["rsa-1"].as_dict(is_private=True))
        del private["kid"]
        self.kidless_signer = JsonWebKey.import_key(private)

    def add_key(self, kty: str, size: int | str, kid: str) -> None:
        key = JsonWebKey.generate_key(kty, size, is_private=True, options={"kid": kid})
        self.signing_keys[kid] = key
        self.published.append(key)

    def retire_key(self, kid: str) -> None:
        self.published = [key for key in self.published if key.as_dict()["kid"] != kid]

    def token(self, kid: str, alg: str = "RS256", **overrides: Any) -> str:
        now = int(time.time())
        payload = {"iss": self.base_url, "aud": AUDIENCE, "sub": "alice", "iat": now}
        payload |= {"exp": now + 600, "realm_access": {"roles": ["analyst"]}} | overrides
        # authlib writes a Key object's own kid into the header, so a kid the provider
        # never published is signed by a kid-less copy of a published key.
        key = self.signing_keys.get(kid, self.kidless_signer)
        token: bytes = jwt.encode({"alg": alg, "kid": kid}, payload, key)
        return token.decode()

    async def discovery(self, request: web.Request) -> web.Response:
        self.requests["discovery"] += 1
        return web.json_response({"issuer": self.base_url, "jwks_uri": f"{self.base_url}/jwks"})

    async def jwks(self, request: web.Request) -> web.Response:
        self.requests["jwks"] += 1
        self.jwks_served.set()
        return web.json_response(KeySet(self.published).as_dict(is_private=False))

    async def redirect(self, request: web.Request) -> web.Response:
        self.requests["redirect"] += 1
        raise web.HTTPFound(f"{self.base_url}/jwks")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/jwks", self.jwks)
        app.router.add_get("/jwks-moved", self.redirect)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        host, port = self.runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def config(self, **overrides: Any) -> IssuerConfig:
        fields: dict[str, Any] = {
            "issuer": self.base_url,
            "audiences": (AUDIENCE,),
            "discovery_url": f"{self.base_url}/.well-known/openid-configuration",
            "allow_insecure_http": True,
            "roles_claim": "realm_access.roles",
        }
        return IssuerConfig(**(fields | overrides))


@pytest.fixture
async def idp() -> AsyncIterator[IdentityProvider]:
    provider = IdentityProvider()
    await provider.start()
    yield provider
    await provider.stop()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


async def _cache(config: IssuerConfig, clock: ManualClock) -> JwksCache:
    cache = JwksCache([config], clock=clock)
    await cache.start()
    return cache


async def test_tokens_of_a_real_issuer_verify_through_discovery(
    idp: IdentityProvider, clock: ManualClock
) -> None:
    config = idp.config()
    cache = await _cache(config, clock)
    try:
        issuers = TrustedIssuers([config])
        principal = await cache.validate(idp.token("rsa-1"), issuers)
        assert (principal.id, principal.issuer, principal.roles) == (
            "alice",
            idp.base_url,
            ("analyst",),
        )
        assert (await cache.validate(idp.token("ec-1", alg="ES256"), issuers)).id == "alice"
        assert idp.requests == Counter({"discovery": 1, "jwks": 1})
    finally:
        await cache.close()


async def test_a_static_jwks_url_works_without_discovery(
    idp: IdentityProvider, clock: ManualClock
) -> None:
    config = idp.config(discovery_url=None, jwks_url=f"{idp.base_url}/jwks")
    cache = await _cache(config, clock)
    try:
        assert (await cache.validate(idp.token("rsa-1"), TrustedIssuers([config]))).id == "alice"
        assert idp.requests == Counter({"jwks": 1})
    finally:
        await cache.close()


async def test_key_rotation_is_picked_up_on_the_unknown_kid_path(
    idp: IdentityProvider, clock: ManualClock
) -> None:
    config = idp.config()
    issuers = TrustedIssuers([config])
    cache = await _cache(config, clock)
    try:
        idp.add_key("RSA", 2048, "rsa-2")
        idp.retire_key("rsa-1")
        rotated = idp.token("rsa-2")
        # Within the rate-limit window the new kid is not fetched for.
        with pytest.raises(AuthError) as caught:
            await cache.validate(rotated, issuers)
        assert (caught.value.reason, idp.requests["jwks"]) == ("unknown_kid", 1)

        clock.now += config.jwks_min_refresh_interval
        assert (await cache.validate(rotated, issuers)).id == "alice"
        assert idp.requests["jwks"] == 2
        # The retired key is gone with the refresh.
        with pytest.raises(AuthError):
            await cache.validate(idp.token("rsa-1"), issuers)
    finally:
        await cache.close()


async def test_a_flood_of_random_kids_causes_at_most_one_fetch(
    idp: IdentityProvider, clock: ManualClock
) -> None:
    config = idp.config()
    issuers = TrustedIssuers([config])
    cache = await _cache(config, clock)
    try:
        clock.now += config.jwks_min_refresh_interval  # a refresh would be allowed now
        before = idp.requests["jwks"]
        flood = [idp.token(secrets.token_hex(8)) for _ in range(200)]
        results = await asyncio.gather(
            *(cache.validate(token, issuers) for token in flood), return_exceptions=True
        )
        assert all(isinstance(result, AuthError) for result in results)
        assert {result.reason for result in results if isinstance(result, AuthError)} == {
            "unknown_kid"
        }
        # ... and the next wave, right after, causes none.
        for token in flood[:50]:
            with pytest.raises(AuthError):
                await cache.validate(token, issuers)
        assert idp.requests["jwks"] - before == 1  # one refresh for 250 misses
        assert idp.requests["discovery"] == 1
    finally:
        await cache.close()


async def test_idp_down_and_key_not_cached_fails_closed_with_503(
    idp: IdentityProvider, clock: ManualClock
) -> None:
    config = idp.config(jwks_fetch_timeout=2.0)
    token = idp.token("rsa-1")
    await idp.stop()
    cache = await _cache(config, clock)
    try:
        for _ in range(2):  # the first after a failed start, the second rate-limited
            with pytest.raises(AuthError) as caught:
                await cache.validate(token, TrustedIssuers([config]))
            assert caught.value.status == 503
            assert caught.value.retriable
        assert cache.status()[0].last_error is not None
    finally:
        await cache.close()


async def test_idp_down_with_cached_key_keeps_validating(
    idp: IdentityProvider, clock: ManualClock
) -> None:
    config = idp.config(jwks_fetch_timeout=2.0)
    issuers = TrustedIssuers([config])
    cache = await _cache(config, clock)
    try:
        await idp.stop()
        clock.now += config.jwks_min_refresh_interval
        # An unknown kid now cannot be decided: the refresh fails, so 503, not 401.
        with pytest.raises(AuthError) as caught:
            await cache.validate(idp.token("rsa-new"), issuers)
        assert caught.value.status == 503
        # The cached key still works while the provider is unreachable.
        assert (await cache.validate(idp.token("rsa-1"), issuers)).id == "alice"
    finally:
        await cache.close()


async def test_redirects_are_not_followed_for_keys(
    idp: IdentityProvider, clock: ManualClock
) -> None:
    config = idp.config(discovery_url=None, jwks_url=f"{idp.base_url}/jwks-moved")
    cache = await _cache(config, clock)
    try:
        with pytest.raises(AuthError) as caught:
            await cache.validate(idp.token("rsa-1"), TrustedIssuers([config]))
        assert caught.value.status == 503
        assert idp.requests == Counter({"redirect": 1})
    finally:
        await cache.close()


async def test_discovery_naming_another_issuer_is_not_trusted(
    idp: IdentityProvider, clock: ManualClock
) -> None:
    impostor = idp.config(issuer="https://login.example.com")
    cache = await _cache(impostor, clock)
    try:
        assert cache.keys_for("https://login.example.com") is None
        assert "different issuer" in (cache.status()[0].last_error or "")
        assert idp.requests["jwks"] == 0
    finally:
        await cache.close()


async def test_an_oversized_key_set_is_refused(idp: IdentityProvider, clock: ManualClock) -> None:
    for index in range(4):
        idp.add_key("EC", "P-256", f"extra-{index}")
    cache = await _cache(idp.config(jwks_max_keys=3), clock)
    try:
        assert cache.keys_for(idp.base_url) is None
        assert "more than the limit" in (cache.status()[0].last_error or "")
    finally:
        await cache.close()


def _publishes(cache: JwksCache, issuer: str, kid: str) -> bool:
    keys = cache.keys_for(issuer)
    return keys is not None and keys.has_kid(kid)


async def test_key_sets_are_refreshed_in_the_background(
    idp: IdentityProvider, clock: ManualClock
) -> None:
    config = idp.config(jwks_min_refresh_interval=1.0)
    cache = await _cache(config, clock)
    try:
        idp.add_key("EC", "P-256", "ec-2")
        clock.now += config.jwks_refresh_interval
        # No request asks for ec-2; the refresher must fetch it by itself (it wakes every
        # jwks_min_refresh_interval of real time).
        idp.jwks_served.clear()
        async with asyncio.timeout(10):
            await idp.jwks_served.wait()
        # Joins the background fetch if it is still parsing (and fetches nothing itself:
        # the attempt is within the rate limit).
        await cache.refresh_on_miss(idp.base_url)
        assert _publishes(cache, idp.base_url, "ec-2")
        assert idp.requests["jwks"] == 2
    finally:
        await cache.close()
