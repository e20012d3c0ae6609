"""The authenticators the proxy runs, in order, and the first one that knows the caller wins.

An `Authenticator` looks at the request's headers and returns a `Principal` when it
recognises credentials it is responsible for, None when there are none of its kind, and
raises `AuthError` when there are but they do not hold (401) or cannot be checked (503).
The chain is written out in one place (`build_chain`), so the order is visible.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from proxy.authn.introspection import TokenIntrospector
from proxy.authn.jwks import JwksCache
from proxy.authn.jwt import (
    IssuerConfig,
    IssuerKeys,
    KeyNotFound,
    KeyStore,
    TrustedIssuers,
    validate,
)
from proxy.authn.principal import AuthError, Principal
from proxy.authn.sessions import SessionAuthenticator
from proxy.authn.tokencache import VerifiedTokenCache

# The request's headers, as the authenticators see them: a case-insensitive mapping.
Headers = Mapping[str, str]


class Authenticator(Protocol):
    async def authenticate(self, headers: Headers) -> Principal | None: ...


class LocalIssuer(Protocol):
    """An issuer in this process (the sidecar's own identity provider): its keys are held
    here, not fetched, and it can say whether a token's session was ended."""

    @property
    def issuer_config(self) -> IssuerConfig: ...

    @property
    def key_store(self) -> KeyStore: ...

    async def is_revoked(self, principal: Principal) -> bool: ...


class _Keys:
    """Remote issuers' keys from the JWKS cache, local issuers' from themselves."""

    def __init__(self, remote: JwksCache, local: Mapping[str, LocalIssuer]) -> None:
        self._remote = remote
        self._local = local

    def keys_for(self, issuer: str) -> IssuerKeys | None:
        own = self._local.get(issuer)
        if own is not None:
            return own.key_store.keys_for(issuer)
        return self._remote.keys_for(issuer)


class BearerJWT:
    """`Authorization: Bearer <JWT>` from the trusted issuers, with a verified-token cache."""

    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        *,
        cache_entries: int,
        local: Sequence[LocalIssuer] = (),
        opaque_elsewhere: bool = False,
    ) -> None:
        # With introspection configured, a bearer token that is not JWT-shaped is left to
        # it (None here) instead of being refused as a malformed JWT.
        self._opaque_elsewhere = opaque_elsewhere
        self._local = {own.issuer_config.issuer: own for own in local}
        self.remote_issuers = TrustedIssuers(issuers)
        self.issuers = TrustedIssuers([*issuers, *(own.issuer_config for own in local)])
        self.keys = JwksCache(issuers)
        self._all_keys = _Keys(self.keys, self._local)
        self.cache = VerifiedTokenCache(max_entries=max(cache_entries, 1))
        self._use_cache = cache_entries > 0
        self._scope = self.issuers.fingerprint

    async def start(self) -> None:
        await self.keys.start()

    async def close(self) -> None:
        await self.keys.close()

    def cached(self, headers: Headers) -> Principal | None:
        """The principal of a bearer token verified before, without awaiting anything;
        None for anything else (no token, a miss, a token of the sidecar's own issuer,
        whose revocation must be asked each time): then `authenticate` decides."""
        authorization = headers.get("Authorization")
        if authorization is None or not self._use_cache:
            return None
        # Keyed by the header value exactly as it was verified: a hit needs no parsing.
        principal = self.cache.get(authorization, self._scope)
        if principal is None or principal.issuer in self._local:
            return None
        return principal

    async def authenticate(self, headers: Headers) -> Principal | None:
        authorization = headers.get("Authorization")
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        token = token.strip()
        if not token:
            raise AuthError("invalid_token", detail="empty bearer token")
        if not token.isascii():
            # aiohttp hands non-UTF-8 header bytes over as surrogate escapes; a token is
            # base64url text, so anything else is refused before it is parsed or cached.
            raise AuthError("invalid_token", detail="bearer token is not ASCII")
        if self._opaque_elsewhere and token.count(".") != 2:
            return None
        principal = self.cache.get(authorization, self._scope) if self._use_cache else None
        if principal is None:
            try:
                principal = validate(token, self.issuers, self._all_keys)
            except KeyNotFound as miss:
                if miss.issuer in self._local:
                    raise
                # A remote issuer may have rotated its keys: one rate-limited refresh.
                principal = await self.keys.validate(token, self.remote_issuers)
            if self._use_cache:
                # The whole header value is the key, so `cached` looks it up unparsed; it
                # names this token and no other (scheme and spacing aside).
                self.cache.put(authorization, self._scope, principal)
        own = self._local.get(principal.issuer)
        # Checked on every request, cached or not: a logout ends the token at once.
        if own is not None and await own.is_revoked(principal):
            raise AuthError("token_revoked", detail="the session of this token has ended")
        return principal


class OpaqueBearer:
    """`Authorization: Bearer <opaque token>` checked by RFC 7662 introspection at each
    configured authorization server in turn (the first that knows the token wins)."""

    def __init__(self, introspectors: Sequence[TokenIntrospector]) -> None:
        self._introspectors = tuple(introspectors)

    async def authenticate(self, headers: Headers) -> Principal | None:
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or token.count(".") == 2:
            return None
        refusal: AuthError | None = None
        for introspector in self._introspectors:
            try:
                return await introspector.authenticate(token)
            except AuthError as exc:
                # Unavailable (503) wins over "not ours" (401): fail closed, say why.
                if refusal is None or exc.status > refusal.status:
                    refusal = exc
        assert refusal is not None
        raise refusal


class CookieSession:
    """A browser's session cookie (set at login by the OIDC or SAML endpoints)."""

    def __init__(self, sessions: SessionAuthenticator) -> None:
        self._sessions = sessions

    async def authenticate(self, headers: Headers) -> Principal | None:
        cookie = headers.get("Cookie")
        if cookie is None:
            return None
        return await self._sessions.authenticate(cookie)


def _not_cached(headers: Headers) -> None:
    return None


class AuthChain:
    """Asks each authenticator in turn; an AuthError from one ends the chain."""

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self.authenticators = tuple(authenticators)
        first = self.authenticators[0] if self.authenticators else None
        # What `authenticate` would return, when that is known without awaiting (a
        # verified-token cache hit of the first authenticator); otherwise None. Only the
        # first may answer early: a later one's answer depends on what the ones before it
        # said. The bearer's own method, bound here: one call less on every request.
        self.cached: Callable[[Headers], Principal | None] = (
            first.cached if isinstance(first, BearerJWT) else _not_cached
        )

    async def authenticate(self, headers: Headers) -> Principal | None:
        for authenticator in self.authenticators:
            principal = await authenticator.authenticate(headers)
            if principal is not None:
                return principal
        return None
