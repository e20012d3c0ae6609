"""What authentication produces: a verified `Principal`, or an `AuthError` saying why not.

Every authenticator (JWT, sessions, SAML, introspection) ends in one of these two, so
authorization, audit and the identity headers sent upstream never need to know how a
caller proved who they are.
"""

from __future__ import annotations

from typing import Literal

import msgspec

AuthMethod = Literal["jwt", "session", "saml", "introspection", "anonymous"]


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """A verified identity. Immutable, so it can be cached and shared between requests."""

    # Stable identifier of the caller, taken from the issuer's principal claim (`sub` by
    # default); unique only together with `issuer`.
    id: str
    # Who vouched for the identity (the token's `iss`, or "sidecar" for its own logins).
    issuer: str
    # How the identity was proved; audit records and policies may distinguish them.
    auth_method: AuthMethod
    roles: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    # Present only when the issuer's email rule accepted it (see IssuerConfig).
    email: str | None = None
    # OAuth2 scopes granted to the token (`scope` or `scp`), for policies that need them.
    scopes: tuple[str, ...] = ()
    # The token id (`jti`), when the issuer sets one: lets audit and revocation name a token.
    token_id: str | None = None
    # Seconds since the epoch after which this identity must no longer be used (`exp`).
    expires_at: float | None = None


def require_unicode(principal: Principal) -> Principal:
    """`principal` as it is, if all its text is valid Unicode; AuthError if not.

    JSON can spell lone surrogates (`"\\udcff"`), which no UTF-8 encoder takes: an identity
    holding one could not be audited, captured or passed upstream as it is, so a token
    that carries one is refused, like any other malformed claim.
    """
    texts = [
        principal.id,
        *principal.roles,
        *principal.groups,
        *principal.scopes,
        principal.email or "",
        principal.token_id or "",
    ]
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        raise AuthError(
            "malformed_claim", detail="a claim is not valid Unicode (lone surrogate)"
        ) from None
    return principal


class AuthError(Exception):
    """Authentication refused or undecidable.

    `reason` is a short, stable code (safe as a metric label and in a `WWW-Authenticate`
    error description); `detail` is for operators' logs. `status` is what the client sees:
    401 when the credentials are bad, 503 when the decision cannot be made (for example the
    identity provider is unreachable and the signing key is not cached) - fail closed,
    never let the request through.
    """

    def __init__(self, reason: str, status: int = 401, *, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.status = status
        self.detail = detail

    @property
    def retriable(self) -> bool:
        """True when the same credentials may succeed later (the refusal was not about them)."""
        return self.status >= 500
