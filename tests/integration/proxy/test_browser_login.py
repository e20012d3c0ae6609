"""Browser login through the real proxy: a browser without credentials is sent to the
OIDC provider (a real authlib authorization server), comes back with a session cookie,
and reaches the data service as the signed-in user; the session cookie never reaches it."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import pytest

from lineage_sidecar.ports import free_port
from tests.integration.authn.oidc.authserver import (
    CLIENT_ID,
    CLIENT_SECRET,
    RESOURCE_CLIENT_ID,
    RESOURCE_CLIENT_SECRET,
    OidcProvider,
)
from tests.integration.authn.saml.idp import IdentityProvider as SamlIdentityProvider
from tests.integration.authn.saml.idp import make_keypair, post_body
from tests.integration.proxy.conftest import RunningProxy, run_proxy

IDP_ENTITY = "https://idp.test/idp"


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[OidcProvider]:
    """The authorization server on its own event loop, so the test may block freely."""
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = OidcProvider()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(15)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


@dataclass
class Browser:
    """Follows nothing by itself; keeps cookies for every loopback port, as browsers do."""

    cookies: dict[str, str] = field(default_factory=dict)

    def get(
        self, url: str, accept: str = "text/html", authorization: str | None = None
    ) -> tuple[int, str, bytes]:
        parts = urlsplit(url)
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = {"Accept": accept}
        if authorization is not None:
            headers["Authorization"] = authorization
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        body = response.read()
        for header in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = header.partition("=")
            value = rest.split(";")[0]
            if "max-age=0" in header.lower():
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        location = response.headers.get("Location", "")
        connection.close()
        return response.status, urljoin(url, location) if location else "", body


@pytest.fixture
def proxy(provider: OidcProvider, echo_upstream: str, tmp_path: Path) -> Iterator[RunningProxy]:
    port = free_port()
    callback = f"http://127.0.0.1:{port}/_sidecar/oauth2/callback"
    provider.register_web_client(callback)
    auth = {
        "sessions": {"signing_keys": ["k" * 40]},
        "oidc": {
            "issuer": provider.issuer,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "callback_url": callback,
            "roles_claim": "roles",
            "allow_insecure_http": True,
        },
        "browser_login": "oidc",
    }
    with run_proxy(
        tmp_path, echo_upstream, extra={"auth": auth}, port=port,
        env={"AUTHLIB_INSECURE_TRANSPORT": "1"},
    ) as running:  # fmt: skip
        yield running


def test_browser_signs_in_and_reaches_the_service(proxy: RunningProxy) -> None:
    browser = Browser()
    status, location, _ = browser.get(f"{proxy.url}/sales/orders.json?x=1")
    assert status == 302
    assert location.startswith(f"{proxy.url}/_sidecar/oauth2/start?rd=%2Fsales%2Forders.json")
    # An API client (no text/html) gets a 401 with a challenge instead.
    assert Browser().get(f"{proxy.url}/sales/orders.json", accept="application/json")[0] == 401
    status, location, _ = browser.get(location)  # -> the provider's authorize endpoint
    assert status == 302
    status, location, _ = browser.get(location)  # provider approves -> our callback
    assert status == 302
    assert location.startswith(f"{proxy.url}/_sidecar/oauth2/callback")
    status, location, _ = browser.get(location)  # callback -> session -> back where we were
    assert status == 302, location
    assert location == f"{proxy.url}/sales/orders.json?x=1"
    session_cookies = [name for name in browser.cookies if "session" in name]
    assert session_cookies
    browser.cookies["theme"] = "dark"
    status, _, body = browser.get(location)
    assert status == 200, body
    seen = json.loads(body)
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-auth-request-user"] == "alice"
    assert headers["x-auth-request-roles"] == "analyst"
    # The upstream sees the service's own cookies, never the proxy's session.
    assert headers.get("cookie") == "theme=dark"


def test_forged_session_cookie_is_not_a_login(proxy: RunningProxy) -> None:
    browser = Browser(cookies={"__Host-lineage_session": "a" * 43 + "." + "b" * 43})
    status, _, _ = browser.get(f"{proxy.url}/sales/orders.json", accept="application/json")
    assert status == 401


def saml_auth(tmp_path: Path, **saml: Any) -> tuple[SamlIdentityProvider, int, str, dict[str, Any]]:
    """A pysaml2 IdP, a port for the proxy (its SP URLs name it), the SAML base URL, and
    the proxy's `auth` section trusting that IdP (with `saml` options added)."""
    keys = tmp_path / "keys"
    keys.mkdir()
    idp = SamlIdentityProvider(tmp_path, IDP_ENTITY, make_keypair(keys, "idp"))
    sp = make_keypair(keys, "sp")
    port = free_port()
    base = f"http://127.0.0.1:{port}/_sidecar/saml"
    auth = {
        "sessions": {"signing_keys": ["k" * 40]},
        "saml": {
            "entity_id": f"{base}/metadata",
            "acs_url": f"{base}/acs",
            "metadata_url": f"{base}/metadata",
            "idp_entity_id": IDP_ENTITY,
            "idp_metadata_file": str(idp.metadata_file),
            "sp_key_file": sp.key_file,
            "sp_cert_file": sp.cert_file,
            "cookie_secure": False,
            **saml,
        },
    }
    return idp, port, base, auth


def post_to_acs(port: int, form: bytes, cookies: str) -> http.client.HTTPResponse:
    """The browser's POST of the IdP's answer to the proxy's ACS, read whole."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request(
        "POST", "/_sidecar/saml/acs", body=form,
        headers={"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookies},
    )  # fmt: skip
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def test_saml_login_through_the_proxy(echo_upstream: str, tmp_path: Path) -> None:
    idp, port, base, auth = saml_auth(
        tmp_path, role_mappings=[{"attribute": "groups", "copy_values": True}]
    )
    auth["browser_login"] = "saml"
    with run_proxy(tmp_path / "proxy", echo_upstream, extra={"auth": auth}, port=port) as proxy:
        browser = Browser()
        status, _, metadata = browser.get(f"{base}/metadata", accept="application/xml")
        assert status == 200
        idp.trust_sp(metadata)
        status, location, _ = browser.get(f"{proxy.url}/sales/orders.json")
        assert status == 302
        assert location.startswith(f"{base}/login?return_to=%2Fsales%2Forders.json")
        status, location, _ = browser.get(location)  # -> the IdP, with a signed AuthnRequest
        assert status == 302
        seen = idp.receive(location)
        answer = idp.respond(seen, attributes={"groups": ["analyst"]})
        form = urlencode(post_body(answer)).encode()
        cookies = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
        response = post_to_acs(port, form, cookies)
        assert response.status == 302
        assert response.headers["Location"] == "/sales/orders.json"
        for header in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = header.partition("=")
            browser.cookies[name] = rest.split(";")[0]
        status, _, body = browser.get(f"{proxy.url}/sales/orders.json")
        assert status == 200, body
        headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert headers["x-auth-request-user"] == "alice@corp.example"
        assert headers["x-auth-request-roles"] == "analyst"
        # The same response again is a replay: refused, no second session.
        assert post_to_acs(port, form, cookies).status in (400, 401)


def test_opaque_tokens_are_introspected(
    provider: OidcProvider, echo_upstream: str, tmp_path: Path
) -> None:
    provider.register_web_client("https://unused.example/cb")
    auth = {
        "introspection": [
            {
                "issuer": provider.issuer,
                "endpoint": provider.issuer + "/introspect",
                "client_id": RESOURCE_CLIENT_ID,
                "client_secret": RESOURCE_CLIENT_SECRET,
                "audiences": [RESOURCE_CLIENT_ID],
                "roles_claim": "roles",
                "allow_insecure_http": True,
            }
        ]
    }
    with run_proxy(
        tmp_path, echo_upstream, extra={"auth": auth}, env={"AUTHLIB_INSECURE_TRANSPORT": "1"}
    ) as proxy:
        token = provider.issue_access_token()
        status, _, body = Browser().get(
            f"{proxy.url}/x", accept="application/json", authorization=f"Bearer {token}"
        )
        assert status == 200, body
        headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
        assert headers["x-auth-request-user"] == "alice"
        status, _, _ = Browser().get(
            f"{proxy.url}/x",
            accept="application/json",
            authorization="Bearer not-a-token-we-issued",
        )
        assert status == 401


def _sign_in(proxy: RunningProxy, browser: Browser) -> str:
    """Walk `browser` through the OIDC login; the session cookie's name."""
    status, location, _ = browser.get(f"{proxy.url}/_sidecar/oauth2/start?rd=/x")
    for _ in range(3):  # start -> provider -> callback -> back to /x
        assert status == 302, location
        if location == f"{proxy.url}/x":
            break
        status, location, _ = browser.get(location)
    assert location == f"{proxy.url}/x"
    (name,) = [name for name in browser.cookies if "session" in name]
    return name


def test_sign_out_through_the_proxy_ends_the_session(proxy: RunningProxy) -> None:
    browser = Browser()
    name = _sign_in(proxy, browser)
    stolen = browser.cookies[name]
    assert browser.get(f"{proxy.url}/x", accept="application/json")[0] == 200
    status, location, _ = browser.get(f"{proxy.url}/_sidecar/oauth2/sign_out?rd=/bye")
    assert status == 302
    assert location == f"{proxy.url}/bye"
    assert name not in browser.cookies
    # The session is over on the server, not only forgotten by this browser: a copy of
    # the cookie (another tab, a stolen one) no longer signs anyone in.
    replayed = Browser(cookies={name: stolen})
    assert replayed.get(f"{proxy.url}/x", accept="application/json")[0] == 401


def test_sign_out_everywhere_through_the_proxy(proxy: RunningProxy) -> None:
    laptop, phone = Browser(), Browser()
    name = _sign_in(proxy, laptop)
    _sign_in(proxy, phone)
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    connection.request(
        "POST", "/_sidecar/oauth2/sign_out", body=b"everywhere=true&rd=/bye",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Cookie": f"{name}={laptop.cookies[name]}",
        },
    )  # fmt: skip
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 302
    # alice's session on the other device has ended too.
    assert phone.get(f"{proxy.url}/x", accept="application/json")[0] == 401


def test_saml_session_ends_when_the_idp_says(echo_upstream: str, tmp_path: Path) -> None:
    """SessionNotOnOrAfter in the assertion bounds the session the proxy starts."""
    idp, port, base, auth = saml_auth(tmp_path)
    with run_proxy(tmp_path / "proxy", echo_upstream, extra={"auth": auth}, port=port) as proxy:
        browser = Browser()
        idp.trust_sp(browser.get(f"{base}/metadata", accept="application/xml")[2])
        status, location, _ = browser.get(f"{base}/login?return_to=/x")
        assert status == 302
        # Far enough ahead that the login below is done well before it, however slow the
        # machine; the assertion carries whole seconds.
        session_end = int(time.time()) + 10
        answer = idp.respond(
            idp.receive(location),
            session_not_on_or_after=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(session_end)),
        )
        cookies = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
        response = post_to_acs(port, urlencode(post_body(answer)).encode(), cookies)
        assert response.status == 302
        (session,) = [h for h in response.headers.get_all("Set-Cookie") or [] if "session" in h]
        name, _, rest = session.partition("=")
        browser.cookies[name] = rest.split(";")[0]
        assert browser.get(f"{proxy.url}/x", accept="application/json")[0] == 200
        # The IdP ended the session: from then on the cookie is no login (it used to
        # last the proxy's own 12 hours).
        while time.time() < session_end + 1:
            time.sleep(0.2)
        assert browser.get(f"{proxy.url}/x", accept="application/json")[0] == 401
