"""Opaque access tokens: RFC 7662 introspection at the issuer, with a short cache.

`principal_from_introspection()` is the pure decision: it accepts a response only when
`active` is exactly `true`, `exp` is present (unless configured otherwise) and in the
future, `nbf` has passed, `iss` (when present, or always when required) equals the
configured issuer, `aud` names a configured audience and `client_id` a configured client
(each when configured), and every required scope was granted (else 403
`insufficient_scope`).

`TokenIntrospector` does the IO and promises:
- the token is posted with the configured client credentials to the configured endpoint
  only; redirects are not followed, responses are size-capped and must be JSON objects;
- the endpoint unreachable, slow, or answering anything but 200 with JSON: `AuthError`
  503 (fail closed; the token is neither accepted nor called invalid);
- results are cached at most `cache_ttl` seconds and never at or past the token's `exp`,
  keyed by SHA-256 of the token together with a fingerprint of the whole configuration
  (issuer, endpoint, audiences, clients, scopes, claim mapping): an entry made under one
  configuration never satisfies another. Refusals are not cached;
- concurrent requests with the same token share one introspection call.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal
from urllib.parse import quote

import aiohttp
import msgspec

from proxy.authn.jwt import check_key_url, strict_json_object
from proxy.authn.principal import AuthError, Principal, require_unicode
from proxy.authn.tokencache import TokenCache, VerifiedTokenCache, cache_key

# RFC 6750 b64token: what a bearer token may consist of. Anything else is not sent out.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MAX_PRINCIPAL_ID_CHARS = 1024
# NumericDate bound, as in jwt.py: larger values are malformed, not "far future".
MAX_DATE = 10**12


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class IntrospectionConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An authorization server whose opaque access tokens are checked by RFC 7662
    introspection."""

    issuer: Annotated[
        str,
        msgspec.Meta(min_length=1),
        _doc("Issuer of the tokens; the principal's issuer, and the `iss` a response must name."),
    ]
    endpoint: Annotated[str, _doc("The introspection endpoint (https).")]
    client_id: Annotated[
        str, msgspec.Meta(min_length=1), _doc("Client id this sidecar authenticates with.")
    ]
    client_secret: Annotated[
        str,
        msgspec.Meta(min_length=1),
        _doc("Client secret (the resolved value of a file:/env: reference)."),
    ]
    auth_method: Annotated[
        Literal["client_secret_basic", "client_secret_post"],
        _doc("How the client credentials are sent to the endpoint."),
    ] = "client_secret_basic"
    audiences: Annotated[
        tuple[str, ...],
        _doc("When not empty, the response's `aud` must name one of these."),
    ] = ()
    allowed_client_ids: Annotated[
        tuple[str, ...],
        _doc(
            "When not empty, the response's `client_id` (who the token was issued to) must be one."
        ),
    ] = ()
    required_scopes: Annotated[
        tuple[str, ...], _doc("Scopes every token must have been granted (all of them).")
    ] = ()
    require_iss: Annotated[
        bool, _doc("Refuse a response without `iss` (one with a different `iss` always is).")
    ] = False
    require_exp: Annotated[
        bool, _doc("Refuse a response without `exp`; without it a token is never cached.")
    ] = True
    principal_claim: Annotated[
        str, _doc("Response member (dotted path) holding the principal id.")
    ] = "sub"
    roles_claim: Annotated[str | None, _doc("Response member (dotted path) holding roles.")] = None
    groups_claim: Annotated[str | None, _doc("Response member (dotted path) holding groups.")] = (
        None
    )
    cache_ttl: Annotated[
        float,
        msgspec.Meta(ge=0, le=300),
        _doc("How long an active result is reused (seconds, never past `exp`; 0 disables)."),
    ] = 30.0
    cache_max_entries: Annotated[
        int, msgspec.Meta(ge=1, le=10_000_000), _doc("Bound on cached results (LRU).")
    ] = 10_000
    timeout: Annotated[
        float, msgspec.Meta(gt=0, le=60), _doc("Whole-request timeout of one introspection.")
    ] = 5.0
    max_token_bytes: Annotated[
        int, msgspec.Meta(ge=16, le=65536), _doc("Longer tokens are refused unsent (bytes).")
    ] = 8192
    max_response_bytes: Annotated[
        int, msgspec.Meta(ge=1024, le=4 * 1024 * 1024), _doc("Larger responses are refused.")
    ] = 64 * 1024
    allow_insecure_http: Annotated[
        bool, _doc("Allow an http:// endpoint. For tests on loopback only.")
    ] = False

    def __post_init__(self) -> None:
        check_key_url(self.endpoint, self.allow_insecure_http, what="endpoint")

    def __repr__(self) -> str:
        return f"IntrospectionConfig(issuer={self.issuer!r}, endpoint={self.endpoint!r})"

    @property
    def fingerprint(self) -> str:
        """Names every setting a cached result depends on (the secret left out)."""
        identity = msgspec.json.encode(msgspec.structs.replace(self, client_secret=""))
        return hashlib.sha256(b"introspection\x00" + identity).hexdigest()


def _claim_at(response: Mapping[str, Any], path: str) -> Any:
    if path in response:
        return response[path]
    value: Any = response
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _strings(value: Any, member: str, *, split: bool = False) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(value.split()) if split else (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise AuthError("malformed_introspection", 503, detail=f"{member} is not string(s)")


def _date(response: Mapping[str, Any], member: str) -> float | None:
    value = response.get(member)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or abs(value) > MAX_DATE:
        raise AuthError("malformed_introspection", 503, detail=f"{member} is not a NumericDate")
    return float(value)


def principal_from_introspection(
    response: Mapping[str, Any], config: IntrospectionConfig, now: float
) -> Principal:
    """Decide on one introspection response. No IO; raises AuthError when refused."""
    if response.get("active") is not True:
        raise AuthError("token_inactive")
    exp = _date(response, "exp")
    nbf = _date(response, "nbf")
    if exp is None and config.require_exp:
        raise AuthError("missing_claim", detail="exp")
    if exp is not None and exp <= now:
        raise AuthError("token_expired")
    if nbf is not None and nbf > now:
        raise AuthError("token_not_yet_valid")
    iss = response.get("iss")
    if (iss is None and config.require_iss) or (iss is not None and iss != config.issuer):
        raise AuthError("wrong_issuer", detail=f"iss={str(iss)[:200]!r}")
    if config.audiences:
        audiences = _strings(response.get("aud"), "aud")
        if not set(audiences) & set(config.audiences):
            raise AuthError("wrong_audience")
    if config.allowed_client_ids and response.get("client_id") not in config.allowed_client_ids:
        raise AuthError("wrong_client")
    scopes = _strings(response.get("scope"), "scope", split=True)
    missing = set(config.required_scopes) - set(scopes)
    if missing:
        raise AuthError("insufficient_scope", 403, detail=" ".join(sorted(missing)))
    principal_id = _claim_at(response, config.principal_claim)
    if not isinstance(principal_id, str) or not 0 < len(principal_id) <= MAX_PRINCIPAL_ID_CHARS:
        raise AuthError("missing_claim", detail=config.principal_claim)
    token_id = response.get("jti")
    return require_unicode(
        Principal(
            id=principal_id,
            issuer=config.issuer,
            auth_method="introspection",
            roles=_strings(_claim_at(response, config.roles_claim), "roles")
            if config.roles_claim
            else (),
            groups=_strings(_claim_at(response, config.groups_claim), "groups")
            if config.groups_claim
            else (),
            scopes=scopes,
            token_id=token_id if isinstance(token_id, str) else None,
            expires_at=exp,
        )
    )


class TokenIntrospector:
    """Checks opaque bearer tokens at one authorization server. Call `start()` inside
    the event loop and `close()` at shutdown."""

    def __init__(
        self,
        config: IntrospectionConfig,
        *,
        session: aiohttp.ClientSession | None = None,
        cache: TokenCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.fingerprint = config.fingerprint
        self._session = session
        self._owns_session = session is None
        self._clock = clock
        # A shared cache is safe: entries are keyed by this configuration's fingerprint.
        self._cache: TokenCache | None = cache
        if cache is None and config.cache_ttl > 0:
            self._cache = VerifiedTokenCache(
                max_entries=config.cache_max_entries, max_ttl=config.cache_ttl, clock=clock
            )
        self._inflight: dict[bytes, asyncio.Task[Principal]] = {}
        self._headers = {"Accept": "application/json"}
        self._credentials: dict[str, str] = {}
        if config.auth_method == "client_secret_basic":
            # RFC 6749 2.3.1: the credentials are form-encoded before Basic encoding.
            self._headers["Authorization"] = aiohttp.encode_basic_auth(
                quote(config.client_id, safe=""), quote(config.client_secret, safe="")
            )
        else:
            self._credentials = {
                "client_id": config.client_id,
                "client_secret": config.client_secret,
            }
        self.calls = 0

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def authenticate(self, token: str) -> Principal:
        """The principal of an active token, or AuthError (401/403; 503 when undecidable)."""
        if len(token) > self.config.max_token_bytes:
            raise AuthError("token_too_large")
        if not _B64TOKEN.fullmatch(token):
            raise AuthError("malformed_token", detail="not an RFC 6750 bearer token")
        if self._cache is not None:
            cached = self._cache.get(token, self.fingerprint)
            if cached is not None:
                return cached
        key = cache_key(token, self.fingerprint)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._introspect(token), name="token-introspection")
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        # Shielded: one caller giving up must not cancel the call the others wait on.
        return await asyncio.shield(task)

    def _forget(self, key: bytes, task: asyncio.Task[Principal]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not reported twice

    async def _introspect(self, token: str) -> Principal:
        response = await self._post(token)
        principal = principal_from_introspection(response, self.config, self._clock())
        if self._cache is not None:
            self._cache.put(token, self.fingerprint, principal)
        return principal

    async def _post(self, token: str) -> dict[str, Any]:
        if self._session is None:
            raise AuthError("introspection_unavailable", 503, detail="start() was not called")
        form = {"token": token, "token_type_hint": "access_token", **self._credentials}
        limit = self.config.max_response_bytes
        self.calls += 1
        try:
            async with asyncio.timeout(self.config.timeout):
                async with self._session.post(
                    self.config.endpoint,
                    data=form,
                    allow_redirects=False,
                    headers=self._headers,
                ) as response:
                    if response.status != 200:
                        raise ValueError(f"endpoint answered HTTP {response.status}")
                    body = bytearray()
                    async for chunk in response.content.iter_chunked(16 * 1024):
                        body += chunk
                        if len(body) > limit:
                            raise ValueError(f"response exceeds {limit} bytes")
            return strict_json_object(bytes(body))
        except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as exc:
            raise AuthError(
                "introspection_unavailable",
                503,
                detail=f"{self.config.endpoint}: {type(exc).__name__}: {exc}"[:300],
            ) from None
