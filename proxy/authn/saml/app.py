"""The SAML endpoints as an aiohttp sub-application, mounted at `ServiceProvider.mount_prefix`.

- `GET  {prefix}/metadata`: the SP metadata XML, rendered once at start.
- `GET  {prefix}/login?return_to=/path`: records a new AuthnRequest id (with the local path
  to return to) and redirects the browser to the IdP (HTTP-Redirect binding). return_to
  must be a local path that `redirects.safe_redirect_target()` accepts, as for OIDC;
  anything else, or two of them, is a 400. With `bind_to_browser`, the browser also gets a
  random cookie scoped to the ACS path whose hash is stored with the request: a response
  to that request is accepted only from the same browser (no login CSRF).
- `POST {prefix}/acs`: the HTTP-POST binding. The body is bounded before it is read, the
  response is shape-checked (`message`), its InResponseTo must be an outstanding request of
  ours, pysaml2 verifies it in a worker thread (xmlsec1), `decision.decide()` applies every
  rule, then the request id is consumed and the assertion id recorded, atomically, so a
  response is accepted at most once. Only then is `on_login(principal, return_to)` called;
  its response is what the browser gets.
Every refusal is a short JSON `{"error": reason}` with 400/401/413 (or 503 when the shared
state cannot be reached: fail closed); a principal is never produced from a refused response.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

import msgspec
from aiohttp import web

from proxy.authn.principal import AuthError, Principal
from proxy.authn.redirects import safe_redirect_target
from proxy.authn.saml.decision import decide
from proxy.authn.saml.message import decode_saml_response, inspect_response, malformed
from proxy.authn.saml.provider import ServiceProvider
from proxy.authn.saml.state import SamlStateStore

log = logging.getLogger(__name__)

LoginCallback = Callable[[Principal, str], Awaitable[web.StreamResponse]]
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
METADATA_CONTENT_TYPE = "application/samlmetadata+xml"
# Each verification runs xmlsec1 processes; bound them so a flood of posts cannot fork
# without limit.
DEFAULT_CONCURRENT_VERIFICATIONS = 4
NO_STORE = {"Cache-Control": "no-store"}
BINDING_COOKIE_PREFIX = "ls_saml_"


class OutstandingRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What the store keeps for an AuthnRequest until its response arrives."""

    return_to: str
    # SHA-256 of the browser's binding cookie; None when binding is off.
    browser: str | None = None


def _digest(token: str) -> str:
    # Cookie bytes that are not UTF-8 arrive as surrogate escapes: a cookie holding them
    # must fail to match, not fail to encode.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def refusal(error: AuthError) -> web.Response:
    """The client's view of a refusal: status and the short reason, never the detail."""
    return web.json_response({"error": error.reason}, status=error.status, headers=NO_STORE)


async def read_bounded_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    too_large = AuthError("saml_too_large", 413, detail=f"body over {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def saml_response_field(body: bytes) -> str:
    """The single `SAMLResponse` value of a form body."""
    try:
        form = parse_qs(body.decode("ascii"), keep_blank_values=True, max_num_fields=16)
    except (UnicodeDecodeError, ValueError):
        raise malformed("body is not a small urlencoded form") from None
    values = form.get("SAMLResponse", [])
    if len(values) != 1:
        raise malformed("expected exactly one SAMLResponse field")
    return values[0]


class SamlEndpoints:
    """Handlers bound to one service provider, state store and login callback."""

    def __init__(
        self,
        provider: ServiceProvider,
        store: SamlStateStore,
        on_login: LoginCallback,
        *,
        clock: Callable[[], float] = time.time,
        concurrent_verifications: int = DEFAULT_CONCURRENT_VERIFICATIONS,
    ) -> None:
        self._provider = provider
        self._config = provider.config
        self._store = store
        self._on_login = on_login
        self._clock = clock
        self._verifications = asyncio.Semaphore(concurrent_verifications)
        self._acs_path = f"{provider.mount_prefix}/acs"

    async def metadata(self, request: web.Request) -> web.Response:
        return web.Response(body=self._provider.metadata_xml, content_type=METADATA_CONTENT_TYPE)

    async def login(self, request: web.Request) -> web.StreamResponse:
        values = request.query.getall("return_to", [])
        # A path on this site only (no allowed hosts), by the check OIDC's return addresses
        # pass; absent or empty means the site root.
        return_to = safe_redirect_target(values[0], ()) if values and values[0] else "/"
        if return_to is None or len(values) > 1:
            log.info("saml login refused: return_to %.200r", values)
            return refusal(AuthError("saml_bad_return_to", 400))
        binding = secrets.token_urlsafe(32) if self._config.bind_to_browser else None
        record = OutstandingRequest(
            return_to=return_to, browser=_digest(binding) if binding else None
        )
        try:
            request_id, location = self._provider.start_login()
            await self._store.remember_request(
                request_id,
                msgspec.json.encode(record).decode("utf-8"),
                self._config.request_ttl_seconds,
            )
        except AuthError as exc:
            log.warning("saml login unavailable: %s", exc)
            return refusal(exc)
        response = web.Response(status=302, headers={"Location": location, **NO_STORE})
        if binding is not None:
            # One cookie per request, so logins started in two tabs do not clobber each
            # other; SameSite=None because the IdP's POST to the ACS is cross-site.
            response.set_cookie(
                self._cookie_name(request_id),
                binding,
                max_age=self._config.request_ttl_seconds,
                path=self._acs_path,
                secure=self._config.cookie_secure,
                httponly=True,
                samesite="None",
            )
        return response

    def _cookie_name(self, request_id: str) -> str:
        return BINDING_COOKIE_PREFIX + _digest(request_id)[:32]

    async def acs(self, request: web.Request) -> web.StreamResponse:
        try:
            principal, return_to, request_id = await self._accept(request)
        except AuthError as exc:
            log.info("saml response refused: %s (%s)", exc.reason, exc.detail)
            return refusal(exc)
        log.info("saml login: %s from %s", principal.id, principal.issuer)
        response = await self._on_login(principal, return_to)
        if self._config.bind_to_browser:
            response.del_cookie(self._cookie_name(request_id), path=self._acs_path)
        return response

    def _check_browser(
        self, request: web.Request, request_id: str, record: OutstandingRequest
    ) -> None:
        if record.browser is None:
            return
        cookie = request.cookies.get(self._cookie_name(request_id), "")
        if not hmac.compare_digest(_digest(cookie), record.browser):
            raise AuthError("saml_browser_mismatch", detail="login was started by another browser")

    async def _accept(self, request: web.Request) -> tuple[Principal, str, str]:
        if request.content_type != FORM_CONTENT_TYPE:
            raise AuthError("saml_malformed", 400, detail=f"content type {request.content_type}")
        body = await read_bounded_body(request, self._config.max_response_bytes)
        xml = decode_saml_response(saml_response_field(body), self._config.max_response_bytes)
        shape = inspect_response(xml, allow_sha1=self._config.allow_sha1_signatures)
        request_id = shape.in_response_to
        if not request_id:
            raise AuthError("saml_unsolicited", detail="response without InResponseTo")
        stored = await self._store.peek_request(request_id)
        if stored is None:
            raise AuthError("saml_unknown_request", detail="InResponseTo is not outstanding")
        try:
            record = msgspec.json.decode(stored, type=OutstandingRequest)
        except msgspec.DecodeError:
            raise AuthError("saml_unknown_request", detail="unreadable request record") from None
        self._check_browser(request, request_id, record)
        return_to = record.return_to

        verify = functools.partial(
            self._provider.verify, shape, request_id=request_id, return_to=return_to
        )
        async with self._verifications:
            facts = await asyncio.get_running_loop().run_in_executor(None, verify)
        if facts.assertion_id != shape.assertion_id:
            raise AuthError("saml_bad_structure", detail="verified a different assertion")
        accepted = decide(facts, self._config, expected_request_id=request_id, now=self._clock())

        # Consume only after every check passed, so a forged post cannot burn a real login;
        # both steps are atomic in the store, so of two identical posts only one gets here.
        if await self._store.take_request(request_id) is None:
            raise AuthError("saml_replay", detail="request id already used")
        if not await self._store.first_use(accepted.assertion_id, accepted.replay_until):
            raise AuthError("saml_replay", detail="assertion id already used")
        return accepted.principal, return_to, request_id


def saml_app(
    provider: ServiceProvider,
    store: SamlStateStore,
    on_login: LoginCallback,
    *,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The SAML sub-application; mount it with `app.add_subapp(provider.mount_prefix, ...)`."""
    endpoints = SamlEndpoints(provider, store, on_login, clock=clock)
    app = web.Application()
    app.router.add_get("/metadata", endpoints.metadata)
    app.router.add_get("/login", endpoints.login)
    app.router.add_post("/acs", endpoints.acs)
    return app
