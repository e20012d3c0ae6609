"""A real authlib authorization server, the sign-in sub-application on a real socket, and
the real test Redis under a key prefix of its own (deleted afterwards)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from proxy.authn.oidc import OIDC_LOGIN_KEY, OidcClientConfig, OidcLogin, create_oidc_app
from proxy.authn.principal import AuthError
from proxy.authn.sessions import (
    RedisSessionStore,
    SessionAuthenticator,
    SessionConfig,
    SessionManager,
)
from tests.integration.authn.oidc.authserver import (
    CLIENT_ID,
    CLIENT_SECRET,
    OidcProvider,
    bound_socket,
)

SESSION_KEY = b"session-signing-key-for-tests-32b!"
ALLOWED_HOST = "app.example.com"


@dataclass
class Browser:
    """A browser as far as sign-in is concerned: follows nothing by itself, keeps cookies
    (one jar for all loopback ports, as browsers do: cookies ignore ports)."""

    http: aiohttp.ClientSession
    cookies: dict[str, str] = field(default_factory=dict)
    set_cookie_headers: list[str] = field(default_factory=list)

    def cookie_header(self) -> str | None:
        return "; ".join(f"{k}={v}" for k, v in self.cookies.items()) or None

    async def get(self, url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
        """One request; returns (status, Location or "", body)."""
        return await self.request("GET", url, headers=headers)

    async def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        data: dict[str, str] | None = None,
    ) -> tuple[int, str, str]:
        sent = dict(headers or {})
        cookie = self.cookie_header()
        if cookie is not None:
            sent.setdefault("Cookie", cookie)
        async with self.http.request(
            method, url, headers=sent, data=data, allow_redirects=False
        ) as response:
            body = await response.text()
            for header in response.headers.getall("Set-Cookie", []):
                self.set_cookie_headers.append(header)
                name, _, rest = header.partition("=")
                value = rest.split(";")[0]
                if "max-age=0" in header.lower():
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = value
            return response.status, response.headers.get("Location", ""), body


@dataclass
class Sidecar:
    """The sign-in sub-application mounted at /oauth2, plus a page that shows who the
    session cookie authenticates (what the proxy's authenticator chain would do)."""

    base_url: str
    callback_url: str
    sessions: SessionManager
    authenticator: SessionAuthenticator
    login: OidcLogin
    authserver: OidcProvider
    http: aiohttp.ClientSession

    def browser(self) -> Browser:
        return Browser(self.http)

    async def sign_in(self, browser: Browser, rd: str = "/datasets") -> tuple[int, str, str]:
        """start → authorize → callback; returns the callback's answer."""
        status, location, _ = await browser.get(f"{self.base_url}/oauth2/start?rd={rd}")
        assert status == 302, location
        status, location, body = await browser.get(location)
        assert status == 302, body
        return await browser.get(location)


@pytest.fixture
async def authserver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OidcProvider]:
    # authlib's server refuses plain http unless told otherwise; this one is on loopback.
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")
    server = OidcProvider()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def key_prefix(redis: Redis) -> AsyncIterator[str]:
    prefix = f"test:oidc:{uuid.uuid4().hex}:"
    yield prefix
    keys = [key async for key in redis.scan_iter(match=prefix + "*")]
    if keys:
        await redis.delete(*keys)


@pytest.fixture
async def sidecar(
    authserver: OidcProvider, redis: Redis, key_prefix: str
) -> AsyncIterator[Sidecar]:
    sock = bound_socket()
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    callback_url = base_url + "/oauth2/callback"
    authserver.register_web_client(callback_url)
    config = OidcClientConfig(
        issuer=authserver.issuer,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        callback_url=callback_url,
        allowed_redirect_hosts=(ALLOWED_HOST,),
        roles_claim="roles",
        allow_insecure_http=True,
    )
    sessions = SessionManager(
        SessionConfig(key_prefix=key_prefix),
        (SESSION_KEY,),
        RedisSessionStore(redis, key_prefix=key_prefix),
    )
    authenticator = SessionAuthenticator(sessions)

    async def whoami(request: web.Request) -> web.Response:
        try:
            principal = await authenticator.authenticate(request.headers.get("Cookie"))
        except AuthError as exc:
            return web.json_response({"error": exc.reason}, status=exc.status)
        if principal is None:
            return web.json_response({"error": "no session"}, status=401)
        return web.json_response(
            {
                "id": principal.id,
                "issuer": principal.issuer,
                "roles": list(principal.roles),
                "auth_method": principal.auth_method,
            }
        )

    oidc = create_oidc_app(config, sessions)
    app = web.Application()
    app.router.add_get("/whoami", whoami)
    app.add_subapp("/oauth2", oidc)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    async with aiohttp.ClientSession() as http:
        yield Sidecar(
            base_url=base_url,
            callback_url=callback_url,
            sessions=sessions,
            authenticator=authenticator,
            login=oidc[OIDC_LOGIN_KEY],
            authserver=authserver,
            http=http,
        )
    await runner.cleanup()
