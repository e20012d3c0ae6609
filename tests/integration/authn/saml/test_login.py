"""SP-initiated login end to end: SP redirect -> pysaml2 IdP -> signed response -> ACS."""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.authn.saml.config import SamlConfigError
from proxy.authn.saml.state import RedisSamlStore
from tests.integration.authn.saml.conftest import ROLE_ATTRIBUTE, SiteFactory
from tests.integration.authn.saml.idp import post_body
from tests.integration.proxy.rawhttp import exchange

ATTRIBUTES = {ROLE_ATTRIBUTE: ["faculty", "alumni"], "groups": ["data-eng"]}


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
async def test_login_yields_principal_with_mapped_roles(
    make_site: SiteFactory, store_kind: str, redis_store: RedisSamlStore
) -> None:
    site = await make_site(store=redis_store if store_kind == "redis" else None)
    seen = await site.login("/data/report?x=1")
    assert seen.signed, "the SP signs its AuthnRequests and the IdP verified the signature"
    assert seen.acs_url == "https://sp.test/saml/acs"

    response = await site.post(site.idp.respond(seen, attributes=ATTRIBUTES))

    assert response.status == 200, await response.text()
    assert await response.json() == {
        "id": "alice@corp.example",
        "roles": ["reader", "writer", "data-eng"],
        "return_to": "/data/report?x=1",
    }
    principal, return_to = site.logins[0]
    assert principal.auth_method == "saml"
    assert principal.issuer == "https://idp.test/idp"
    assert principal.token_id is not None
    assert return_to == "/data/report?x=1"


async def test_signed_response_and_assertion_accepted(make_site: SiteFactory) -> None:
    site = await make_site()
    seen = await site.login()
    response = await site.post(site.idp.respond(seen, sign_response=True))
    assert response.status == 200, await response.text()


async def test_metadata_names_configured_urls(make_site: SiteFactory) -> None:
    site = await make_site()
    response = await site.client.get("/saml/metadata", headers={"Host": "evil.example"})
    body = await response.text()
    assert response.headers["Content-Type"].startswith("application/samlmetadata+xml")
    assert 'entityID="https://sp.test/saml/metadata"' in body
    assert 'Location="https://sp.test/saml/acs"' in body
    assert "evil.example" not in body


@pytest.mark.parametrize(
    "return_to",
    [
        "https://evil.example/",
        "//evil.example",
        "/\\evil.example",
        "javascript:x",
        # Each becomes //evil.example, /\evil.example or /<tab>/evil.example in anything
        # that decodes once more before redirecting.
        "/%2F%2Fevil.example",
        "/%5Cevil.example",
        "/%09/evil.example",
    ],
)
async def test_login_refuses_offsite_return_to(make_site: SiteFactory, return_to: str) -> None:
    site = await make_site()
    response = await site.client.get(
        "/saml/login", params={"return_to": return_to}, allow_redirects=False
    )
    assert response.status == 400
    assert (await response.json()) == {"error": "saml_bad_return_to"}


async def test_login_refuses_two_return_to(make_site: SiteFactory) -> None:
    site = await make_site()
    response = await site.client.get(
        "/saml/login?return_to=/a&return_to=//evil.example", allow_redirects=False
    )
    assert response.status == 400
    assert (await response.json()) == {"error": "saml_bad_return_to"}


@pytest.mark.parametrize("query", ["", "?return_to="])
async def test_login_without_return_to_returns_to_the_site_root(
    make_site: SiteFactory, query: str
) -> None:
    site = await make_site()
    response = await site.client.get(f"/saml/login{query}", allow_redirects=False)
    assert response.status == 302, await response.text()
    seen = site.idp.receive(response.headers["Location"])
    assert (await site.post(site.idp.respond(seen))).status == 200
    assert [return_to for _, return_to in site.logins] == ["/"]


async def test_redis_store_shares_state_between_sp_instances(
    make_site: SiteFactory, redis_store: RedisSamlStore
) -> None:
    """Two workers with one Redis: a response used at one is a replay at the other."""
    first = await make_site(store=redis_store)
    second = await make_site(store=redis_store)
    seen = await first.login()
    xml = first.idp.respond(seen)
    # The same browser, reaching the other worker.
    jar = first.client.session.cookie_jar
    second.client.session.cookie_jar.update_cookies(
        jar.filter_cookies(first.client.make_url("/saml/acs"))
    )
    assert (await second.post(xml)).status == 200
    replay = await first.post(xml)
    assert replay.status == 401
    assert first.logins == []


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
async def test_concurrent_posts_of_one_response_log_in_once(
    make_site: SiteFactory, store_kind: str, redis_store: RedisSamlStore
) -> None:
    site = await make_site(store=redis_store if store_kind == "redis" else None)
    xml = site.idp.respond(await site.login())
    responses = await asyncio.gather(*(site.post(xml) for _ in range(4)))
    assert sorted(r.status for r in responses) == [200, 401, 401, 401]
    assert len(site.logins) == 1


async def test_redis_outage_fails_closed(make_site: SiteFactory) -> None:
    redis = Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))
    try:
        site = await make_site(store=RedisSamlStore(redis))
        response = await site.client.get("/saml/login", allow_redirects=False)
        assert response.status == 503
        assert await response.json() == {"error": "saml_state_unavailable"}
    finally:
        await redis.aclose()


async def test_idp_missing_from_metadata_fails_at_start(
    make_site: SiteFactory,
) -> None:
    with pytest.raises(SamlConfigError, match="idp_entity_id"):
        await make_site(idp_entity_id="https://not-in-metadata.test/idp")


async def test_binding_cookie_attributes(make_site: SiteFactory) -> None:
    site = await make_site(cookie_secure=True)
    response = await site.client.get("/saml/login", allow_redirects=False)
    [cookie] = response.headers.getall("Set-Cookie")
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "secure", "samesite", "path", "max-age"} <= attributes
    assert "SameSite=None" in cookie
    assert "Path=/saml/acs" in cookie


async def test_response_from_another_browser_refused(make_site: SiteFactory) -> None:
    """Login CSRF: the attacker's own genuine response, posted by the victim's browser."""
    site = await make_site()
    xml = site.idp.respond(await site.login(), name_id="mallory@corp.example")
    async with aiohttp.ClientSession() as victim:
        response = await victim.post(site.client.make_url("/saml/acs"), data=post_body(xml))
        assert response.status == 401
        assert await response.json() == {"error": "saml_browser_mismatch"}
    assert site.logins == []
    # The browser that started the login can still finish it.
    assert (await site.post(xml)).status == 200


async def test_binding_cookie_that_is_not_utf8_is_another_browser(make_site: SiteFactory) -> None:
    site = await make_site()
    xml = site.idp.respond(await site.login())
    acs = site.client.make_url("/saml/acs")
    [name] = site.client.session.cookie_jar.filter_cookies(acs).keys()
    body = urlencode(post_body(xml)).encode()
    request = (
        b"POST /saml/acs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Cookie: " + name.encode() + b"=\xff\xfe\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
    assert acs.port is not None
    # No client library sends header bytes that are not UTF-8; the socket work runs in a
    # thread, the server in this loop.
    reply = await asyncio.to_thread(exchange, acs.port, request, method="POST")
    assert reply.status == 401, reply.body
    assert reply.json() == {"error": "saml_browser_mismatch"}
    assert site.logins == []
    # The browser that started the login can still finish it.
    assert (await site.post(xml)).status == 200


async def test_binding_cookie_cleared_after_login(make_site: SiteFactory) -> None:
    site = await make_site()
    xml = site.idp.respond(await site.login())
    response = await site.post(xml)
    assert response.status == 200
    [cleared] = response.headers.getall("Set-Cookie")
    assert "Max-Age=0" in cleared
    assert not site.client.session.cookie_jar.filter_cookies(site.client.make_url("/saml/acs"))


async def test_two_logins_in_parallel_tabs(make_site: SiteFactory) -> None:
    site = await make_site()
    first, second = await site.login("/one"), await site.login("/two")
    assert (await site.post(site.idp.respond(second))).status == 200
    assert (await site.post(site.idp.respond(first))).status == 200
    assert [return_to for _, return_to in site.logins] == ["/two", "/one"]


async def test_without_browser_binding_no_cookie_is_needed(make_site: SiteFactory) -> None:
    site = await make_site(bind_to_browser=False)
    response = await site.client.get("/saml/login", allow_redirects=False)
    assert "Set-Cookie" not in response.headers
    xml = site.idp.respond(site.idp.receive(response.headers["Location"]))
    async with aiohttp.ClientSession() as other:
        posted = await other.post(site.client.make_url("/saml/acs"), data=post_body(xml))
        assert posted.status == 200
