"""The identity provider's HTTP face: an aiohttp sub-application.

Routes (relative to the issuer URL's path, `IdpConfig.mount_path`):
- `POST /auth/login`   {"username", "password"} (JSON or form) -> token response
- `POST /auth/refresh` {"refresh_token"} -> token response with the NEXT refresh token
- `POST /auth/logout`  `Authorization: Bearer <access token>`, or {"refresh_token"}
- `GET /.well-known/jwks.json`, `GET /.well-known/openid-configuration`

Promises: every URL it publishes is built from the configured issuer, never from the
request; request bodies are read up to `MAX_BODY_BYTES` (413 beyond); malformed, hostile
or oversized input gets a 4xx JSON error (`error`, `error_description`); Redis trouble is
503 (fail closed, retriable); every outcome of login, refresh and logout is an
`AuthEvent`; token responses are `Cache-Control: no-store`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.authn.idp.config import IdpConfig
from proxy.authn.idp.events import AuthEvent, AuthEventKind, AuthEventSink, event_username
from proxy.authn.idp.keys import SigningKeyRing
from proxy.authn.idp.ratelimit import (
    LoginRateLimiter,
    MemoryLoginRateLimiter,
    RedisLoginRateLimiter,
)
from proxy.authn.idp.refresh import (
    MemoryRefreshStore,
    RedisRefreshStore,
    RefreshStore,
    Refuse,
    Reuse,
    TransactionContention,
)
from proxy.authn.idp.tokens import access_claims, family_of_jti, own_issuer_config
from proxy.authn.idp.tokens import parse_refresh_token as parse_token
from proxy.authn.idp.users import (
    MAX_PASSWORD_BYTES,
    FileUserStore,
    PasswordVerifier,
    User,
    UserStore,
    VerifierBusy,
    valid_username,
)
from proxy.authn.jwt import (
    IssuerConfig,
    StaticKeys,
    TrustedIssuers,
    strict_json_object,
    validate,
)
from proxy.authn.principal import AuthError, Principal

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024
MAX_FORM_FIELDS = 8
_JSON = "application/json"
_FORM = "application/x-www-form-urlencoded"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_PUBLIC_CACHE = {"Cache-Control": "public, max-age=300"}

ClientAddress = Callable[[web.Request], str]


class Problem(Exception):
    """A refusal with the status and OAuth-style error code the client sees."""

    def __init__(
        self, status: int, error: str, description: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status = status
        self.error = error
        self.description = description
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body = {"error": self.error, "error_description": self.description}
        return web.json_response(body, status=self.status, headers={**_NO_STORE, **self.headers})


def _remote_address(request: web.Request) -> str:
    return request.remote or "unknown"


@web.middleware
async def _problems(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as problem:
        return problem.response()
    except VerifierBusy as exc:
        log.warning("login refused: %s", exc)
        return Problem(
            503, "temporarily_unavailable", "too many logins at once", {"Retry-After": "1"}
        ).response()
    except (RedisError, TransactionContention) as exc:
        # Cannot decide without the shared state: fail closed, retriable.
        log.error("identity provider state unavailable: %s: %s", type(exc).__name__, exc)
        return Problem(
            503, "temporarily_unavailable", "try again shortly", {"Retry-After": "1"}
        ).response()


async def read_fields(request: web.Request) -> dict[str, Any]:
    """The JSON object or form fields of a request body, or a Problem (400/413/415)."""
    if request.content_type not in (_JSON, _FORM):
        raise Problem(415, "invalid_request", f"send {_JSON} or {_FORM}")
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise Problem(413, "invalid_request", f"body larger than {MAX_BODY_BYTES} bytes")
    body = bytearray()
    while chunk := await request.content.read(MAX_BODY_BYTES + 1 - len(body)):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise Problem(413, "invalid_request", f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        if request.content_type == _JSON:
            return strict_json_object(bytes(body))
        pairs = parse_qsl(
            body.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=bool(body),
            errors="strict",
            max_num_fields=MAX_FORM_FIELDS,
        )
    except ValueError as exc:  # UnicodeDecodeError and JSON errors are ValueErrors
        raise Problem(400, "invalid_request", f"unreadable body: {str(exc)[:100]}") from None
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise Problem(400, "invalid_request", "a form field is repeated")
    return fields


def string_field(fields: Mapping[str, Any], name: str) -> str:
    value = fields.get(name)
    if value is None:
        raise Problem(400, "invalid_request", f"{name} is missing")
    if not isinstance(value, str):
        raise Problem(400, "invalid_request", f"{name} must be a string")
    return value


class IdentityProvider:
    """Login, refresh, logout and key publication for the sidecar's own users."""

    def __init__(
        self,
        config: IdpConfig,
        *,
        users: UserStore,
        keys: SigningKeyRing,
        redis: Redis | None,
        events: AuthEventSink,
        verifier: PasswordVerifier,
        client_address: ClientAddress = _remote_address,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.keys = keys
        self._users = users
        self._events = events
        self._verifier = verifier
        self._client_address = client_address
        self._clock = clock
        self.refresh_store: RefreshStore
        self._limiter: LoginRateLimiter
        if redis is None:
            log.warning(
                "identity provider without Redis: sessions, revocations and login rate limits "
                "live in this process only (one worker; lost on restart)"
            )
            self.refresh_store = MemoryRefreshStore(
                idle_ttl=config.refresh_idle_ttl,
                absolute_ttl=config.refresh_absolute_ttl,
                access_ttl=config.access_token_ttl,
                clock=clock,
            )
            self._limiter = MemoryLoginRateLimiter(config.rate_limit)
        else:
            self.refresh_store = RedisRefreshStore(
                redis,
                prefix=config.key_prefix,
                idle_ttl=config.refresh_idle_ttl,
                absolute_ttl=config.refresh_absolute_ttl,
                access_ttl=config.access_token_ttl,
                clock=clock,
            )
            self._limiter = RedisLoginRateLimiter(
                redis, config.rate_limit, prefix=config.key_prefix
            )
        self.issuer_config: IssuerConfig = own_issuer_config(config, keys.algorithms)
        self.key_store = StaticKeys({config.issuer: keys.verification_keys})
        self._trusted = TrustedIssuers([self.issuer_config])
        self._discovery = json.dumps(self._discovery_document()).encode("utf-8")

    @classmethod
    def from_config(
        cls,
        config: IdpConfig,
        *,
        redis: Redis | None,
        events: AuthEventSink,
        client_address: ClientAddress = _remote_address,
    ) -> IdentityProvider:
        """Load users and keys (creating the key file if absent). Blocking: call at start."""
        users = FileUserStore.load(config.users_file)
        keys = SigningKeyRing.load(config.key_file, create_algorithm=config.algorithm)
        verifier = PasswordVerifier(
            cost=users.cost, threads=config.hash_threads, max_pending=config.max_pending_hashes
        )
        return cls(
            config,
            users=users,
            keys=keys,
            redis=redis,
            events=events,
            verifier=verifier,
            client_address=client_address,
        )

    def _discovery_document(self) -> dict[str, Any]:
        issuer = self.config.issuer
        algorithms = list(self.keys.algorithms)
        # A discovery document for verifiers: this provider has no authorization endpoint.
        return {
            "issuer": issuer,
            "jwks_uri": self.config.jwks_uri,
            "token_endpoint": f"{issuer}/auth/login",
            "refresh_endpoint": f"{issuer}/auth/refresh",
            "revocation_endpoint": f"{issuer}/auth/logout",
            "grant_types_supported": ["password", "refresh_token"],
            "token_endpoint_auth_methods_supported": ["none"],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algorithms,
            "token_endpoint_auth_signing_alg_values_supported": algorithms,
            "claims_supported": ["iss", "aud", "sub", "roles", "iat", "nbf", "exp", "jti"],
        }

    def app(self) -> web.Application:
        """The sub-application; mount it at `config.mount_path` (or serve it at the root)."""
        application = web.Application(middlewares=[_problems])
        application.add_routes(
            [
                web.post("/auth/login", self.login),
                web.post("/auth/refresh", self.refresh),
                web.post("/auth/logout", self.logout),
                web.get("/.well-known/jwks.json", self.jwks),
                web.get("/.well-known/openid-configuration", self.openid_configuration),
            ]
        )
        application.on_cleanup.append(self._close)
        return application

    async def _close(self, _: web.Application) -> None:
        self._verifier.close()

    def _emit(
        self,
        kind: AuthEventKind,
        request: web.Request,
        *,
        reason: str | None = None,
        username: str | None = None,
        family: str | None = None,
    ) -> None:
        self._events.emit(
            AuthEvent(
                kind=kind,
                reason=reason,
                username=event_username(username),
                client_address=self._client_address(request),
                family=family,
                time=self._clock(),
            )
        )

    def _token_response(self, user: User, family: str, refresh_token: str) -> web.Response:
        ttl = self.config.access_token_ttl
        claims = access_claims(
            issuer=self.config.issuer,
            audience=self.config.audience,
            subject=user.name,
            roles=user.roles,
            family=family,
            now=int(self._clock()),
            ttl=ttl,
        )
        body = {
            "access_token": self.keys.sign(claims),
            "token_type": "Bearer",
            "expires_in": ttl,
            "refresh_token": refresh_token,
        }
        return web.json_response(body, headers=_NO_STORE)

    async def login(self, request: web.Request) -> web.Response:
        fields = await read_fields(request)
        username = string_field(fields, "username")
        password = string_field(fields, "password")
        if not valid_username(username):
            raise Problem(400, "invalid_request", "username must be 1-256 printable characters")
        try:
            password_bytes = len(password.encode("utf-8"))
        except UnicodeEncodeError:
            raise Problem(400, "invalid_request", "password is not valid Unicode") from None
        if not 0 < password_bytes <= MAX_PASSWORD_BYTES:
            raise Problem(400, "invalid_request", f"password must be 1-{MAX_PASSWORD_BYTES} bytes")
        wait = await self._limiter.hit(username, self._client_address(request))
        if wait:
            self._emit("login_rate_limited", request, reason="too_many_attempts", username=username)
            raise Problem(
                429, "too_many_requests", "too many login attempts", {"Retry-After": str(wait)}
            )
        user = await self._users.get(username)
        outcome = await self._verifier.check(user, password)
        if outcome != "ok" or user is None:
            self._emit("login_failed", request, reason=outcome, username=username)
            # One answer for every failure, so it does not tell which names exist.
            raise Problem(401, "invalid_credentials", "wrong username or password")
        family, refresh_token = await self.refresh_store.start_family(user.name)
        self._emit("login_succeeded", request, username=user.name, family=family)
        return self._token_response(user, family, refresh_token)

    async def refresh(self, request: web.Request) -> web.Response:
        fields = await read_fields(request)
        token = parse_token(string_field(fields, "refresh_token"))
        if token is None:
            self._emit("refresh_failed", request, reason="malformed_token")
            raise Problem(400, "invalid_grant", "refresh token is not valid")
        outcome = await self.refresh_store.rotate(token)
        if isinstance(outcome, Refuse):
            self._emit("refresh_failed", request, reason=outcome.reason)
            raise Problem(400, "invalid_grant", "refresh token is not valid")
        if isinstance(outcome, Reuse):
            self._emit(
                "refresh_reuse_detected",
                request,
                reason="refresh_token_reused",
                username=outcome.subject,
                family=outcome.family,
            )
            raise Problem(400, "invalid_grant", "refresh token is not valid")
        user = await self._users.get(outcome.subject)
        if user is None or user.disabled:
            # The account changed since login: the session ends here.
            await self.refresh_store.revoke_family(outcome.family)
            reason = "unknown_user" if user is None else "user_disabled"
            self._emit(
                "refresh_failed",
                request,
                reason=reason,
                username=outcome.subject,
                family=outcome.family,
            )
            raise Problem(400, "invalid_grant", "refresh token is not valid")
        self._emit("refresh_succeeded", request, username=user.name, family=outcome.family)
        return self._token_response(user, outcome.family, outcome.refresh_token)

    async def logout(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            principal = self._bearer_principal(authorization)
            family = family_of_jti(principal.token_id)
            if family is None:
                raise _invalid_token("token names no session")
            await self.refresh_store.revoke_family(family)
            self._emit("logout", request, username=principal.id, family=family)
            return web.json_response({"revoked": True}, headers=_NO_STORE)
        fields = await read_fields(request)
        token = parse_token(string_field(fields, "refresh_token"))
        if token is None:
            raise Problem(400, "invalid_request", "refresh_token is malformed")
        record = await self.refresh_store.lookup(token)
        if record is None:
            # RFC 7009: an unknown or expired token is not an error; nothing is left to end.
            return web.json_response({"revoked": False}, headers=_NO_STORE)
        await self.refresh_store.revoke_family(record.family)
        if record.used:
            self._emit(
                "refresh_reuse_detected",
                request,
                reason="consumed_token_at_logout",
                username=record.subject,
                family=record.family,
            )
        self._emit("logout", request, username=record.subject, family=record.family)
        return web.json_response({"revoked": True}, headers=_NO_STORE)

    def _bearer_principal(self, authorization: str) -> Principal:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _invalid_token("expected Authorization: Bearer <access token>")
        try:
            return validate(token.strip(), self._trusted, self.key_store)
        except AuthError as exc:
            raise _invalid_token(exc.reason) from None

    async def jwks(self, _: web.Request) -> web.Response:
        return web.Response(
            body=self.keys.jwks_document, content_type="application/json", headers=_PUBLIC_CACHE
        )

    async def openid_configuration(self, _: web.Request) -> web.Response:
        return web.Response(
            body=self._discovery, content_type="application/json", headers=_PUBLIC_CACHE
        )

    async def is_revoked(self, principal: Principal) -> bool:
        """Whether an access token this provider issued belongs to an ended session.

        Principals of other issuers are not this provider's to judge (False). A token of
        ours without a session in its jti is refused (True): ours always carry one. Redis
        trouble is an AuthError 503: the proxy must not let the request through.
        """
        if principal.issuer != self.config.issuer:
            return False
        family = family_of_jti(principal.token_id)
        if family is None:
            return True
        try:
            return await self.refresh_store.is_family_revoked(family)
        except RedisError as exc:
            raise AuthError(
                "revocation_unavailable", 503, detail=f"{type(exc).__name__}: {exc}"
            ) from None


def _invalid_token(description: str) -> Problem:
    return Problem(
        401,
        "invalid_token",
        description,
        {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{description}"'},
    )
