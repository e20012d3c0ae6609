"""Browser sign-in at an OpenID Connect provider: authorization code flow with PKCE.

`create_oidc_app()` returns an aiohttp sub-application, meant to be mounted at `/oauth2`:
- `GET /start?rd=/path` sends the browser to the provider's authorization endpoint (from
  OIDC discovery) with a fresh `state`, `nonce` and PKCE S256 `code_challenge`. The
  `redirect_uri` is the CONFIGURED callback URL, never derived from the request (aiohttp
  reads `Host: good@evil` as host `evil`). `rd` must pass `safe_redirect_target()`.
  The pending login (nonce, PKCE verifier, return path) is kept server-side under a hash
  of `state`; the state itself goes in a short-lived `__Host-` cookie, which binds the
  login to the browser that started it (no login CSRF);
- `GET /callback?code&state` requires the state cookie to equal `state`, claims the
  pending login (single use: a replayed callback finds nothing), exchanges the code with
  the PKCE verifier at the token endpoint, validates the ID token with `jwt.validate()`
  against the provider's JWKS (audience = client id, `azp` when several audiences) and
  checks its `nonce`. Only then is a session created (a new id; the browser's previous
  session ends) and the browser sent to the return path. Every failure is a 400/401/503
  page and never a session;
- `GET|POST /sign_out?rd=/path` ends the browser's session; `POST` with
  `everywhere=true` ends every session of the principal. A POST body must be an
  urlencoded form (415 otherwise, 400 when it cannot be read as one).
authlib's protocol layer builds the authorization URL, the PKCE challenge, the token
request and the client authentication; the IO is aiohttp, with the same rules as the key
fetches in jwks.py (no redirects, size caps, timeouts).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

import aiohttp
import msgspec
from aiohttp import web
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.client import OAuth2Client
from authlib.oauth2.rfc6749.parameters import prepare_token_request

from proxy.authn.jwks import JwksCache
from proxy.authn.jwt import IssuerConfig, TrustedIssuers, check_key_url, strict_json_object
from proxy.authn.principal import AuthError, Principal
from proxy.authn.redirects import check_allowed_hosts, safe_redirect_target
from proxy.authn.sessions import SessionManager, cookie_from_header

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 256 * 1024
# Retries of a failed discovery are spaced by this much, so a down provider is not hammered.
DISCOVERY_RETRY_S = 5.0
_PENDING_PREFIX = "oidc:"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_FIELDS = 16


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class OidcClientConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """This sidecar as an OIDC relying party: browser sign-in at the company IdP."""

    issuer: Annotated[
        str, msgspec.Meta(min_length=1), _doc("The provider's issuer identifier (exact `iss`).")
    ]
    client_id: Annotated[str, msgspec.Meta(min_length=1), _doc("Client id at the provider.")]
    callback_url: Annotated[
        str,
        _doc(
            "Absolute https URL of `/oauth2/callback` as registered at the provider; sent as "
            "`redirect_uri`. Never derived from the request's Host header."
        ),
    ]
    client_secret: Annotated[
        str | None,
        _doc("Client secret (resolved value of a file:/env: reference); none for a public client."),
    ] = None
    token_endpoint_auth_method: Annotated[
        Literal["client_secret_basic", "client_secret_post", "none"] | None,
        _doc("How the client authenticates at the token endpoint (default: basic with a secret)."),
    ] = None
    discovery_url: Annotated[
        str | None,
        _doc("OIDC discovery document; default `<issuer>/.well-known/openid-configuration`."),
    ] = None
    scopes: Annotated[
        tuple[str, ...], _doc("Scopes requested at sign-in; must include `openid`.")
    ] = ("openid", "email", "profile")
    allowed_redirect_hosts: Annotated[
        tuple[str, ...],
        _doc(
            "Hosts an absolute return-to URL (`rd`) may point at (exact, lower-case, punycode). "
            "Local paths are always allowed."
        ),
    ] = ()
    default_return_path: Annotated[
        str, _doc("Where the browser goes after sign-in when `rd` is not given.")
    ] = "/"
    login_timeout: Annotated[
        float,
        msgspec.Meta(ge=30, le=3600),
        _doc("How long a started sign-in may take before its state expires (seconds)."),
    ] = 600.0
    state_cookie_name: Annotated[
        str, _doc("Cookie binding a pending sign-in to the browser that started it.")
    ] = "__Host-lineage_oidc"
    principal_claim: Annotated[str, _doc("ID token claim holding the principal id.")] = "sub"
    roles_claim: Annotated[str | None, _doc("ID token claim (dotted path) holding roles.")] = None
    groups_claim: Annotated[str | None, _doc("ID token claim (dotted path) holding groups.")] = None
    allowed_email_domains: Annotated[
        tuple[str, ...],
        _doc("When not empty, only users whose verified email is in one of these domains."),
    ] = ()
    algorithms: Annotated[
        tuple[str, ...] | None, _doc("ID token algorithms accepted (default as for issuers).")
    ] = None
    leeway: Annotated[
        int, msgspec.Meta(ge=0, le=300), _doc("Clock skew tolerated on the ID token (seconds).")
    ] = 30
    http_timeout: Annotated[
        float,
        msgspec.Meta(gt=0, le=60),
        _doc("Timeout of one request to the provider (seconds)."),
    ] = 10.0
    allow_insecure_http: Annotated[
        bool, _doc("Allow http:// provider and callback URLs. For tests on loopback only.")
    ] = False

    def __post_init__(self) -> None:
        check_key_url(self.callback_url, self.allow_insecure_http, what="callback_url")
        check_key_url(self.effective_discovery_url, self.allow_insecure_http, what="discovery_url")
        if "openid" not in self.scopes:
            raise ValueError("scopes: must include openid")
        check_allowed_hosts(self.allowed_redirect_hosts)
        if safe_redirect_target(self.default_return_path, self.allowed_redirect_hosts) is None:
            raise ValueError("default_return_path: must be a local path or an allowed host")
        if self.client_secret is None and self.token_endpoint_auth_method not in (None, "none"):
            raise ValueError("token_endpoint_auth_method: needs client_secret")
        # Validates the ID-token rules (algorithms, email domains) at load time too.
        self.issuer_config()

    def __repr__(self) -> str:
        return f"OidcClientConfig(issuer={self.issuer!r}, client_id={self.client_id!r})"

    @property
    def effective_discovery_url(self) -> str:
        if self.discovery_url is not None:
            return self.discovery_url
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"

    @property
    def auth_method(self) -> str:
        if self.token_endpoint_auth_method is not None:
            return self.token_endpoint_auth_method
        return "client_secret_basic" if self.client_secret is not None else "none"

    def issuer_config(self) -> IssuerConfig:
        """How ID tokens of this provider are validated: audience is the client id, and a
        nonce must be present."""
        return IssuerConfig(
            issuer=self.issuer,
            audiences=(self.client_id,),
            discovery_url=self.effective_discovery_url,
            algorithms=self.algorithms,
            leeway=self.leeway,
            required_claims=("nonce",),
            principal_claim=self.principal_claim,
            roles_claim=self.roles_claim,
            groups_claim=self.groups_claim,
            allowed_email_domains=self.allowed_email_domains,
            allow_insecure_http=self.allow_insecure_http,
        )


class ProviderMetadata(msgspec.Struct, frozen=True):
    """The parts of the discovery document sign-in needs."""

    authorization_endpoint: str
    token_endpoint: str


class PendingLogin(msgspec.Struct, frozen=True):
    """What /start leaves for /callback, stored under a hash of `state`."""

    nonce: str
    code_verifier: str
    return_to: str


_pending_encoder = msgspec.msgpack.Encoder()
_pending_decoder = msgspec.msgpack.Decoder(PendingLogin)


class SignInError(Exception):
    """A sign-in that must end in an error page; the message is safe to show."""

    def __init__(self, status: int, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail


def parse_discovery(document: Mapping[str, Any], config: OidcClientConfig) -> ProviderMetadata:
    """Check a discovery document against the configuration; ValueError says why not."""
    if document.get("issuer") != config.issuer:
        raise ValueError("discovery document names a different issuer")
    endpoints = {}
    for name in ("authorization_endpoint", "token_endpoint"):
        url = document.get(name)
        if not isinstance(url, str):
            raise ValueError(f"discovery document has no {name}")
        check_key_url(url, config.allow_insecure_http, what=name)
        endpoints[name] = url
    methods = document.get("code_challenge_methods_supported")
    if isinstance(methods, list) and "S256" not in methods:
        raise ValueError("the provider does not support PKCE S256")
    return ProviderMetadata(**endpoints)


def id_token_claims(id_token: str) -> dict[str, Any]:
    """The payload of an ID token that `jwt.validate()` has already accepted."""
    segment = id_token.split(".")[1]
    return strict_json_object(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def check_id_token_binding(claims: Mapping[str, Any], nonce: str, client_id: str) -> None:
    """The ID token must answer THIS sign-in (nonce) for THIS client (azp). Pure."""
    token_nonce = claims.get("nonce")
    if not isinstance(token_nonce, str) or not hmac.compare_digest(
        token_nonce.encode(), nonce.encode()
    ):
        raise AuthError("nonce_mismatch")
    aud = claims.get("aud")
    azp = claims.get("azp")
    # OIDC Core 3.1.3.7: with several audiences, azp must name us.
    if isinstance(aud, list) and len(aud) > 1 and azp != client_id:
        raise AuthError("wrong_authorized_party")
    if azp is not None and azp != client_id:
        raise AuthError("wrong_authorized_party")


def _pending_key(state: str) -> str:
    return _PENDING_PREFIX + hashlib.sha256(state.encode()).hexdigest()


class OidcLogin:
    """The sign-in flow for one provider. `create_oidc_app()` wires it into aiohttp."""

    def __init__(
        self,
        config: OidcClientConfig,
        sessions: SessionManager,
        *,
        http: aiohttp.ClientSession | None = None,
        jwks: JwksCache | None = None,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self._http = http
        self._owns_http = http is None
        issuer_config = config.issuer_config()
        self._trusted = TrustedIssuers([issuer_config])
        self._jwks = jwks if jwks is not None else JwksCache([issuer_config], session=http)
        self._owns_jwks = jwks is None
        # authlib builds the authorization URL and PKCE challenge; it does no IO here.
        self._oauth = OAuth2Client(
            None,
            client_id=config.client_id,
            client_secret=config.client_secret,
            token_endpoint_auth_method=config.auth_method,
            scope=" ".join(config.scopes),
            redirect_uri=config.callback_url,
            code_challenge_method="S256",
        )
        self._client_auth = ClientAuth(config.client_id, config.client_secret, config.auth_method)
        self._provider: ProviderMetadata | None = None
        self._discovery_lock = asyncio.Lock()
        self._next_discovery = -float("inf")
        self._state_cookie_attributes = (
            f"Path=/; Max-Age={int(config.login_timeout)}; Secure; HttpOnly; SameSite=Lax"
        )

    async def start(self) -> None:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        if self._owns_jwks:
            await self._jwks.start()
        try:
            await self.provider()
        except SignInError as exc:
            log.warning("OIDC provider %r not ready yet: %s", self.config.issuer, exc.detail)

    async def close(self) -> None:
        if self._owns_jwks:
            await self._jwks.close()
        if self._owns_http and self._http is not None:
            await self._http.close()
            self._http = None

    async def provider(self) -> ProviderMetadata:
        """The provider's endpoints, discovered once (retried, spaced, while it fails)."""
        if self._provider is not None:
            return self._provider
        async with self._discovery_lock:
            if self._provider is None and time.monotonic() >= self._next_discovery:
                self._next_discovery = time.monotonic() + DISCOVERY_RETRY_S
                try:
                    document = strict_json_object(
                        await self._get(self.config.effective_discovery_url)
                    )
                    self._provider = parse_discovery(document, self.config)
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    raise SignInError(
                        503, "The identity provider is unavailable.", detail=str(exc)[:300]
                    ) from None
        if self._provider is None:
            raise SignInError(503, "The identity provider is unavailable.", detail="retry later")
        return self._provider

    async def _get(self, url: str) -> bytes:
        async with asyncio.timeout(self.config.http_timeout):
            assert self._http is not None
            async with self._http.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise ValueError(f"{url} answered HTTP {response.status}")
                return await _read_capped(response)

    # -- the three endpoints ------------------------------------------------------------

    async def handle_start(self, request: web.Request) -> web.StreamResponse:
        return_to = request.query.get("rd", self.config.default_return_path)
        if safe_redirect_target(return_to, self.config.allowed_redirect_hosts) is None:
            raise SignInError(400, "The return address is not allowed.")
        provider = await self.provider()
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32)
        # RFC 7636 4.1: 43 to 128 characters; 64 random bytes give 86.
        code_verifier = secrets.token_urlsafe(64)
        pending = PendingLogin(nonce=nonce, code_verifier=code_verifier, return_to=return_to)
        await self.sessions.store.stash(
            _pending_key(state), _pending_encoder.encode(pending), self.config.login_timeout
        )
        url, _ = self._oauth.create_authorization_url(
            provider.authorization_endpoint,
            state=state,
            code_verifier=code_verifier,
            nonce=nonce,
        )
        response = _redirect(url)
        response.headers.add(
            "Set-Cookie",
            f"{self.config.state_cookie_name}={state}; {self._state_cookie_attributes}",
        )
        return response

    async def handle_callback(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        cookie_header = request.headers.get("Cookie")
        if "error" in query:
            # The provider refused (user cancelled, consent denied); its words are not shown.
            state = query.get("state")
            if state:
                await self.sessions.store.claim(_pending_key(state))
            raise SignInError(401, "Sign-in was refused by the identity provider.")
        state, code = query.get("state"), query.get("code")
        if not state or not code:
            raise SignInError(400, "The sign-in response is incomplete.")
        bound_state = cookie_from_header(cookie_header, self.config.state_cookie_name)
        # Cookie bytes that are not UTF-8 arrive as surrogate escapes: such a cookie must
        # fail to match, not fail to encode.
        if bound_state is None or not hmac.compare_digest(
            bound_state.encode("utf-8", "surrogatepass"), state.encode("utf-8", "surrogatepass")
        ):
            raise SignInError(400, "This sign-in was not started in this browser.")
        raw = await self.sessions.store.claim(_pending_key(state))
        if raw is None:
            raise SignInError(400, "This sign-in has expired or was already used.")
        pending = _pending_decoder.decode(raw)
        principal = await self._redeem(code, pending)
        cookie_value = await self.sessions.create(
            msgspec.structs.replace(principal, auth_method="session"),
            previous_cookie_header=cookie_header,
        )
        # Checked again: the configuration may have changed since /start.
        target = safe_redirect_target(pending.return_to, self.config.allowed_redirect_hosts)
        response = _redirect(target or self.config.default_return_path)
        response.headers.add("Set-Cookie", self.sessions.set_cookie_header(cookie_value))
        response.headers.add("Set-Cookie", self._clear_state_cookie())
        return response

    async def handle_sign_out(self, request: web.Request) -> web.StreamResponse:
        form = await _read_form(request) if request.method == "POST" else None
        fields: Mapping[str, str] = form if form is not None else request.query
        return_to = fields.get("rd") or self.config.default_return_path
        target = safe_redirect_target(return_to, self.config.allowed_redirect_hosts)
        if target is None:
            raise SignInError(400, "The return address is not allowed.")
        session_id = self.sessions.session_id_from(request.headers.get("Cookie"))
        if session_id is not None:
            principal = await self.sessions.end(session_id)
            # Only POST: a cross-site GET (a link, an image) must not sign a user out
            # everywhere; SameSite=Lax withholds the cookie from cross-site POSTs.
            everywhere = form is not None and form.get("everywhere") == "true"
            if principal is not None and everywhere:
                await self.sessions.end_everywhere(principal)
        response = _redirect(target)
        response.headers.add("Set-Cookie", self.sessions.clear_cookie_header)
        return response

    # -- code redemption ------------------------------------------------------------------

    async def _redeem(self, code: str, pending: PendingLogin) -> Principal:
        provider = await self.provider()
        body = prepare_token_request(
            "authorization_code",
            code=code,
            redirect_uri=self.config.callback_url,
            code_verifier=pending.code_verifier,
        )
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        url, headers, body = self._client_auth.prepare(
            "POST", provider.token_endpoint, headers, body
        )
        tokens = await self._post_token_request(url, headers, body)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise SignInError(401, "The identity provider sent no ID token.")
        try:
            principal = await self._jwks.validate(id_token, self._trusted)
            check_id_token_binding(id_token_claims(id_token), pending.nonce, self.config.client_id)
        except AuthError as exc:
            if exc.status >= 500:
                raise SignInError(
                    503, "The identity provider is unavailable.", detail=str(exc)
                ) from None
            raise SignInError(401, "The ID token was not accepted.", detail=str(exc)) from None
        return principal

    async def _post_token_request(
        self, url: str, headers: dict[str, str], body: str
    ) -> dict[str, Any]:
        assert self._http is not None
        try:
            async with asyncio.timeout(self.config.http_timeout):
                async with self._http.post(
                    url, data=body.encode(), headers=headers, allow_redirects=False
                ) as response:
                    status = response.status
                    document = await _read_capped(response)
            tokens = strict_json_object(document)
        except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as exc:
            raise SignInError(
                503, "The identity provider is unavailable.", detail=f"token endpoint: {exc}"
            ) from None
        if status == 200 and "error" not in tokens:
            return tokens
        if 400 <= status < 500:
            # invalid_grant: a replayed or foreign code, or a wrong PKCE verifier.
            raise SignInError(
                401, "The identity provider refused the sign-in.", detail=str(tokens.get("error"))
            )
        raise SignInError(503, "The identity provider is unavailable.", detail=f"HTTP {status}")

    def _clear_state_cookie(self) -> str:
        return (
            f"{self.config.state_cookie_name}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Lax"
        )


async def _read_form(request: web.Request) -> dict[str, str]:
    """The fields of a POSTed sign-out form (the first value of each name). Browsers send
    forms urlencoded, the body ASCII and its escapes UTF-8 whatever `charset` says; any
    other body is refused with an error page. No body is an empty form."""
    if not request.body_exists:
        return {}
    if request.content_type != FORM_CONTENT_TYPE:
        raise SignInError(415, f"Sign out with a form sent as {FORM_CONTENT_TYPE}.")
    body = await request.read()
    try:
        fields = parse_qs(
            body.decode("ascii"),
            keep_blank_values=True,
            errors="strict",
            max_num_fields=MAX_FORM_FIELDS,
        )
    except ValueError:  # UnicodeDecodeError included: raw bytes or escapes that are not UTF-8
        raise SignInError(400, "The sign-out form could not be read.") from None
    return {name: values[0] for name, values in fields.items()}


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    if response.content_length is not None and response.content_length > MAX_DOCUMENT_BYTES:
        raise ValueError(f"response exceeds {MAX_DOCUMENT_BYTES} bytes")
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_DOCUMENT_BYTES:
            raise ValueError(f"response exceeds {MAX_DOCUMENT_BYTES} bytes")
    return bytes(body)


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


OIDC_LOGIN_KEY = web.AppKey("oidc_login", OidcLogin)


def create_oidc_app(
    config: OidcClientConfig,
    sessions: SessionManager,
    *,
    http: aiohttp.ClientSession | None = None,
    jwks: JwksCache | None = None,
) -> web.Application:
    """The sign-in sub-application; mount it with `parent.add_subapp("/oauth2", app)` so
    that `callback_url` ends in `/oauth2/callback`. Startup and cleanup follow the parent."""
    login = OidcLogin(config, sessions, http=http, jwks=jwks)
    app = web.Application(middlewares=[_error_pages])
    app[OIDC_LOGIN_KEY] = login
    app.router.add_get("/start", login.handle_start)
    app.router.add_get("/callback", login.handle_callback)
    app.router.add_route("GET", "/sign_out", login.handle_sign_out)
    app.router.add_route("POST", "/sign_out", login.handle_sign_out)

    async def on_startup(_: web.Application) -> None:
        await login.start()

    async def on_cleanup(_: web.Application) -> None:
        await login.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


@web.middleware
async def _error_pages(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except SignInError as exc:
        if exc.detail:
            log.info("sign-in failed (%d): %s: %s", exc.status, exc.message, exc.detail)
        return _error_page(exc.status, exc.message)
    except AuthError as exc:
        # Only the session store raises this here: fail closed.
        log.warning("sign-in failed: %s", exc)
        return _error_page(exc.status, "Sign-in is unavailable right now.")


def _error_page(status: int, message: str) -> web.Response:
    return web.Response(
        status=status,
        text=message + "\n",
        content_type="text/plain",
        headers={"Cache-Control": "no-store"},
    )
