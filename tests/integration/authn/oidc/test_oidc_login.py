"""Browser sign-in end to end: the sidecar against a real authlib authorization server,
sessions in the real Redis. Every hostile variation must end without a session."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.authn.oidc import OidcClientConfig, create_oidc_app
from proxy.authn.principal import Principal
from proxy.authn.sessions import InProcessSessionStore, SessionConfig, SessionManager
from tests.integration.authn.oidc.authserver import CLIENT_ID, bound_socket
from tests.integration.authn.oidc.conftest import Browser, Sidecar
from tests.integration.proxy.rawhttp import Reply, exchange

SESSION_COOKIE = "__Host-lineage_session"
STATE_COOKIE = "__Host-lineage_oidc"


async def whoami(sidecar: Sidecar, browser: Browser) -> tuple[int, dict[str, object]]:
    status, _, body = await browser.get(sidecar.base_url + "/whoami")
    return status, json.loads(body)


def query(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


async def authorized_callback(sidecar: Sidecar, browser: Browser) -> str:
    """Start a sign-in and let the provider approve it; the callback URL, not yet visited."""
    status, location, _ = await browser.get(f"{sidecar.base_url}/oauth2/start?rd=/x")
    assert status == 302
    status, callback, body = await browser.get(location)
    assert status == 302, body
    return callback


async def test_sign_in_ends_in_a_session_for_the_provider_user(sidecar: Sidecar) -> None:
    browser = sidecar.browser()
    status, location, _ = await sidecar.sign_in(browser, rd="/datasets/sales?view=1")
    assert (status, location) == (302, "/datasets/sales?view=1")
    assert await whoami(sidecar, browser) == (
        200,
        {
            "id": "alice",
            "issuer": sidecar.authserver.issuer,
            "roles": ["analyst"],
            "auth_method": "session",
        },
    )
    # The state cookie is spent, and the session cookie has the protective attributes.
    assert STATE_COOKIE not in browser.cookies
    session_header = next(h for h in browser.set_cookie_headers if h.startswith(SESSION_COOKIE))
    attributes = {part.strip() for part in session_header.split(";")[1:]}
    assert {"Path=/", "Secure", "HttpOnly", "SameSite=Lax"} <= attributes


async def test_start_sends_pkce_state_nonce_and_the_configured_redirect_uri(
    sidecar: Sidecar,
) -> None:
    browser = sidecar.browser()
    status, location, _ = await browser.get(f"{sidecar.base_url}/oauth2/start")
    assert status == 302
    assert location.startswith(sidecar.authserver.issuer + "/authorize?")
    params = query(location)
    assert params["response_type"] == "code"
    assert params["client_id"] == CLIENT_ID
    assert params["redirect_uri"] == sidecar.callback_url
    assert params["code_challenge_method"] == "S256"
    assert len(params["code_challenge"]) == 43
    assert len(params["state"]) >= 43
    assert len(params["nonce"]) >= 43
    assert "openid" in params["scope"].split()
    assert browser.cookies[STATE_COOKIE] == params["state"]
    state_header = next(h for h in browser.set_cookie_headers if h.startswith(STATE_COOKIE))
    attributes = {part.strip() for part in state_header.split(";")[1:]}
    assert {"Path=/", "Secure", "HttpOnly", "SameSite=Lax"} <= attributes
    # A second start gets fresh values.
    _, again, _ = await sidecar.browser().get(f"{sidecar.base_url}/oauth2/start")
    assert query(again)["state"] != params["state"]
    assert query(again)["nonce"] != params["nonce"]
    assert query(again)["code_challenge"] != params["code_challenge"]


@pytest.mark.parametrize("host", ["good@evil.example", "evil.example", "evil.example:443"])
async def test_host_header_never_changes_the_redirect_uri(sidecar: Sidecar, host: str) -> None:
    status, location, _ = await sidecar.browser().get(
        f"{sidecar.base_url}/oauth2/start", headers={"Host": host}
    )
    assert status == 302
    assert query(location)["redirect_uri"] == sidecar.callback_url


@pytest.mark.parametrize(
    "rd",
    [
        "//evil.example",
        "/\\evil.example",
        "https://evil.example",
        "https://evil.example/x",
        "https://app.example.com@evil.example/",
        "javascript:alert(1)",
        "/%2F%2Fevil.example",
        "\\\\evil.example",
        "https:evil.example",
    ],
)
async def test_return_address_elsewhere_is_refused_at_start(sidecar: Sidecar, rd: str) -> None:
    browser = sidecar.browser()
    status, location, body = await browser.get(
        f"{sidecar.base_url}/oauth2/start?{urlencode({'rd': rd})}"
    )
    assert (status, location) == (400, "")
    assert "return address" in body
    assert STATE_COOKIE not in browser.cookies


async def test_allow_listed_absolute_return_address_is_honoured(sidecar: Sidecar) -> None:
    browser = sidecar.browser()
    rd = "https://app.example.com/reports?id=7"
    status, location, _ = await sidecar.sign_in(browser, rd=urlencode({"": rd})[1:])
    assert (status, location) == (302, rd)


async def test_callback_without_state_is_refused(sidecar: Sidecar) -> None:
    browser = sidecar.browser()
    callback = await authorized_callback(sidecar, browser)
    code = query(callback)["code"]
    status, _, _ = await browser.get(f"{sidecar.callback_url}?code={code}")
    assert status == 400
    assert await whoami(sidecar, browser) == (401, {"error": "no session"})


async def test_callback_with_another_state_is_refused(sidecar: Sidecar) -> None:
    browser = sidecar.browser()
    callback = await authorized_callback(sidecar, browser)
    code = query(callback)["code"]
    status, _, _ = await browser.get(f"{sidecar.callback_url}?code={code}&state=forged")
    assert status == 400
    assert SESSION_COOKIE not in browser.cookies


async def test_callback_in_a_browser_that_did_not_start_the_sign_in_is_refused(
    sidecar: Sidecar,
) -> None:
    # Login CSRF: the attacker's own callback URL, visited by the victim's browser.
    attacker = sidecar.browser()
    callback = await authorized_callback(sidecar, attacker)
    victim = sidecar.browser()
    status, _, _ = await victim.get(callback)
    assert status == 400
    assert SESSION_COOKIE not in victim.cookies


async def raw_get(sidecar: Sidecar, target: str, cookie: bytes) -> Reply:
    """A GET with a Cookie header of exactly these bytes (no client library sends bytes
    that are not UTF-8); the socket work runs in a thread, the server in this loop."""
    port = urlsplit(sidecar.base_url).port
    assert port is not None
    request = (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
        + b"Cookie: "
        + cookie
        + b"\r\nConnection: close\r\n\r\n"
    )
    return await asyncio.to_thread(exchange, port, request)


async def test_state_cookie_that_is_not_utf8_is_refused_like_another_state(
    sidecar: Sidecar,
) -> None:
    browser = sidecar.browser()
    callback = await authorized_callback(sidecar, browser)
    state = browser.cookies[STATE_COOKIE].encode()
    parts = urlsplit(callback)
    reply = await raw_get(
        sidecar, f"{parts.path}?{parts.query}", STATE_COOKIE.encode() + b"=" + state + b"\xff"
    )
    assert (reply.status, reply.body) == (400, b"This sign-in was not started in this browser.\n")
    assert reply.header_all("Set-Cookie") == []
    # The refusal did not use up the sign-in: the browser that started it finishes it.
    status, _, _ = await browser.get(callback)
    assert status == 302
    assert SESSION_COOKIE in browser.cookies


async def test_state_is_single_use(sidecar: Sidecar) -> None:
    browser = sidecar.browser()
    callback = await authorized_callback(sidecar, browser)
    state_cookie = browser.cookies[STATE_COOKIE]
    status, _, _ = await browser.get(callback)
    assert status == 302
    # Replay the same callback with the state cookie put back.
    replay = sidecar.browser()
    replay.cookies[STATE_COOKIE] = state_cookie
    status, _, body = await replay.get(callback)
    assert status == 400
    assert "already used" in body
    assert SESSION_COOKIE not in replay.cookies


async def test_code_replay_is_refused_by_the_provider(sidecar: Sidecar) -> None:
    first = sidecar.browser()
    callback = await authorized_callback(sidecar, first)
    assert (await first.get(callback))[0] == 302
    # The same code, in a fresh sign-in of another browser (valid state of its own).
    second = sidecar.browser()
    _, location, _ = await second.get(f"{sidecar.base_url}/oauth2/start")
    state = query(location)["state"]
    status, _, _ = await second.get(
        f"{sidecar.callback_url}?{urlencode({'code': query(callback)['code'], 'state': state})}"
    )
    assert status == 401
    assert SESSION_COOKIE not in second.cookies


async def test_intercepted_code_fails_the_pkce_check(sidecar: Sidecar) -> None:
    victim = sidecar.browser()
    victim_callback = await authorized_callback(sidecar, victim)
    # The attacker injects the victim's code into a sign-in of their own: their PKCE
    # verifier does not match the victim's challenge, and the provider refuses.
    attacker = sidecar.browser()
    _, location, _ = await attacker.get(f"{sidecar.base_url}/oauth2/start")
    params = {"code": query(victim_callback)["code"], "state": query(location)["state"]}
    requests_before = sidecar.authserver.token_requests
    status, _, body = await attacker.get(f"{sidecar.callback_url}?{urlencode(params)}")
    assert status == 401
    assert "refused" in body
    assert sidecar.authserver.token_requests == requests_before + 1
    assert SESSION_COOKIE not in attacker.cookies


async def test_nonce_mismatch_is_refused(sidecar: Sidecar) -> None:
    sidecar.authserver.id_token_nonce = "a-nonce-from-another-sign-in"
    browser = sidecar.browser()
    status, _, body = await sidecar.sign_in(browser)
    assert status == 401
    assert "ID token" in body
    assert SESSION_COOKIE not in browser.cookies


async def test_id_token_for_another_audience_is_refused(sidecar: Sidecar) -> None:
    sidecar.authserver.id_token_audience = "some-other-client"
    browser = sidecar.browser()
    status, _, _ = await sidecar.sign_in(browser)
    assert status == 401
    assert SESSION_COOKIE not in browser.cookies


async def test_provider_error_is_a_401_without_session(sidecar: Sidecar) -> None:
    browser = sidecar.browser()
    _, location, _ = await browser.get(f"{sidecar.base_url}/oauth2/start")
    state = query(location)["state"]
    status, _, body = await browser.get(
        f"{sidecar.callback_url}?error=access_denied&error_description=<script>&state={state}"
    )
    assert status == 401
    assert "<script>" not in body
    # The pending sign-in is gone too: the state cannot be used afterwards.
    status, _, _ = await browser.get(f"{sidecar.callback_url}?code=x&state={state}")
    assert status == 400


async def test_token_endpoint_down_is_503_without_session(sidecar: Sidecar) -> None:
    browser = sidecar.browser()
    callback = await authorized_callback(sidecar, browser)
    await sidecar.authserver.close()
    status, _, _ = await browser.get(callback)
    assert status == 503
    assert SESSION_COOKIE not in browser.cookies


async def test_sign_in_replaces_a_planted_session(sidecar: Sidecar) -> None:
    planted = await sidecar.sessions.create(
        Principal(id="mallory", issuer="https://elsewhere", auth_method="session")
    )
    browser = sidecar.browser()
    browser.cookies[SESSION_COOKIE] = planted
    status, _, _ = await sidecar.sign_in(browser)
    assert status == 302
    assert browser.cookies[SESSION_COOKIE] != planted
    assert (await whoami(sidecar, browser))[1]["id"] == "alice"
    # The planted session itself is over, not merely shadowed.
    stale = sidecar.browser()
    stale.cookies[SESSION_COOKIE] = planted
    assert (await whoami(sidecar, stale))[0] == 401


async def test_tampered_session_cookie_is_no_session(sidecar: Sidecar) -> None:
    browser = sidecar.browser()
    await sidecar.sign_in(browser)
    value = browser.cookies[SESSION_COOKIE]
    session_id, mac = value.split(".")
    for forged in (
        session_id[:-1] + ("A" if session_id[-1] != "A" else "B") + "." + mac,
        session_id + "." + mac[::-1],
        session_id,
        "",
        value + "=",
    ):
        browser.cookies[SESSION_COOKIE] = forged
        assert (await whoami(sidecar, browser))[0] == 401


async def test_sign_out_ends_the_session(sidecar: Sidecar) -> None:
    browser = sidecar.browser()
    await sidecar.sign_in(browser)
    value = browser.cookies[SESSION_COOKIE]
    status, location, _ = await browser.get(f"{sidecar.base_url}/oauth2/sign_out?rd=/bye")
    assert (status, location) == (302, "/bye")
    assert SESSION_COOKIE not in browser.cookies
    # The old cookie, kept by an attacker, no longer works.
    browser.cookies[SESSION_COOKIE] = value
    assert (await whoami(sidecar, browser))[0] == 401


async def test_sign_out_refuses_a_return_address_elsewhere(sidecar: Sidecar) -> None:
    browser = sidecar.browser()
    await sidecar.sign_in(browser)
    status, _, _ = await browser.get(f"{sidecar.base_url}/oauth2/sign_out?rd=//evil.example")
    assert status == 400


async def test_sign_out_everywhere_needs_post_and_ends_every_session(sidecar: Sidecar) -> None:
    laptop, phone, tablet = sidecar.browser(), sidecar.browser(), sidecar.browser()
    for browser in (laptop, phone, tablet):
        await sidecar.sign_in(browser)
    # A GET (a link or image another site could plant) ends only its own session.
    await laptop.get(f"{sidecar.base_url}/oauth2/sign_out?everywhere=true")
    assert (await whoami(sidecar, laptop))[0] == 401
    assert (await whoami(sidecar, phone))[0] == 200
    status, _, _ = await phone.request(
        "POST", f"{sidecar.base_url}/oauth2/sign_out", data={"everywhere": "true"}
    )
    assert status == 302
    assert (await whoami(sidecar, phone))[0] == 401
    assert (await whoami(sidecar, tablet))[0] == 401


@pytest.mark.parametrize(
    ("content_type", "body", "status", "message"),
    [
        ("application/x-www-form-urlencoded", b"rd=/x\xff", 400, "could not be read"),
        ("application/x-www-form-urlencoded", b"rd=/x%ff", 400, "could not be read"),
        (
            "multipart/form-data; boundary=zz",
            b"--zz\r\ngarbage",
            415,
            "sent as application/x-www-form-urlencoded",
        ),
        ("multipart/form-data", b"rd=/x", 415, "sent as application/x-www-form-urlencoded"),
        ("application/json", b'{"rd": "/x"}', 415, "sent as application/x-www-form-urlencoded"),
    ],
)
async def test_sign_out_with_an_unreadable_body_is_refused_and_keeps_the_session(
    sidecar: Sidecar, content_type: str, body: bytes, status: int, message: str
) -> None:
    browser = sidecar.browser()
    await sidecar.sign_in(browser)
    cookie = browser.cookie_header()
    assert cookie is not None
    async with sidecar.http.post(
        f"{sidecar.base_url}/oauth2/sign_out",
        data=body,
        headers={"Content-Type": content_type, "Cookie": cookie},
        allow_redirects=False,
    ) as response:
        assert response.status == status
        assert message in await response.text()
        assert "Set-Cookie" not in response.headers
    assert (await whoami(sidecar, browser))[0] == 200


async def test_sign_out_form_charset_is_not_consulted(sidecar: Sidecar) -> None:
    # Browsers encode forms as UTF-8 escapes; a charset the server cannot know changes nothing.
    browser = sidecar.browser()
    await sidecar.sign_in(browser)
    status, location, _ = await browser.request(
        "POST",
        f"{sidecar.base_url}/oauth2/sign_out",
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=nonexistent"},
        data={"rd": "/bye"},
    )
    assert (status, location) == (302, "/bye")
    assert (await whoami(sidecar, browser))[0] == 401


async def test_provider_unreachable_at_start_is_503() -> None:
    sock = bound_socket()
    issuer = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()  # nothing listens there (yet)
    config = OidcClientConfig(
        issuer=issuer,
        client_id=CLIENT_ID,
        client_secret="x" * 32,
        callback_url="http://127.0.0.1:1/oauth2/callback",
        allow_insecure_http=True,
    )
    sessions = SessionManager(SessionConfig(), (b"k" * 32,), InProcessSessionStore())
    app = web.Application()
    app.add_subapp("/oauth2", create_oidc_app(config, sessions))
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/oauth2/start", allow_redirects=False)
        assert response.status == 503
        assert "unavailable" in await response.text()
        assert "Location" not in response.headers
