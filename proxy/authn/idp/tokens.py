"""What the identity provider issues, as pure functions: access-token claims, refresh tokens.

- An access token is a JWT with `iss`, `aud`, `sub`, `roles`, `iat`, `nbf`, `exp` and a
  `jti` of the form `<family>.<nonce>`: the family names the login session (refresh token
  family), so revocation of a session can be checked from the `jti` alone, which is all
  `Principal` carries (`token_id`). Family ids are random and are not credentials.
- A refresh token is `lsrt_` followed by 256 random bits in base64url (43 characters): the
  prefix makes leaked tokens recognisable to secret scanners. Only its SHA-256 is stored.
  `parse_refresh_token` accepts exactly that shape, canonically encoded, and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from typing import Any

from proxy.authn.idp.config import IdpConfig
from proxy.authn.jwt import IssuerConfig

REFRESH_TOKEN_PREFIX = "lsrt_"  # noqa: S105 (a marker, not a secret)
REFRESH_TOKEN_BYTES = 32
FAMILY_ID_BYTES = 16
_REFRESH_TOKEN = re.compile(r"lsrt_[A-Za-z0-9_-]{43}")
_ID = r"[A-Za-z0-9_-]{22}"
_JTI = re.compile(rf"(?P<family>{_ID})\.{_ID}")


def _random_id(size: int) -> str:
    return secrets.token_urlsafe(size)


def new_family_id() -> str:
    """A fresh login-session id: 128 random bits, base64url (22 characters)."""
    return _random_id(FAMILY_ID_BYTES)


def new_refresh_token() -> str:
    return REFRESH_TOKEN_PREFIX + _random_id(REFRESH_TOKEN_BYTES)


def parse_refresh_token(value: object) -> str | None:
    """`value` if it is a well-formed refresh token, else None (never raises)."""
    if not isinstance(value, str) or not _REFRESH_TOKEN.fullmatch(value):
        return None
    body = value[len(REFRESH_TOKEN_PREFIX) :]
    raw = base64.urlsafe_b64decode(body + "=")
    # 43 characters carry 258 bits; a token whose last 2 bits are set is a second spelling
    # of another one, and is refused so every token has exactly one form.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != body:
        return None
    return value


def refresh_token_digest(token: str) -> str:
    """What is stored for a refresh token: its SHA-256, hex. 256 random bits need no salt."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def new_jti(family: str) -> str:
    return f"{family}.{_random_id(FAMILY_ID_BYTES)}"


def family_of_jti(jti: str | None) -> str | None:
    """The family named by an access token's jti, or None if it has not our shape."""
    if jti is None:
        return None
    match = _JTI.fullmatch(jti)
    return match["family"] if match else None


def access_claims(
    *,
    issuer: str,
    audience: str,
    subject: str,
    roles: tuple[str, ...],
    family: str,
    now: int,
    ttl: int,
) -> dict[str, Any]:
    """The claims of one access token, valid from `now` for `ttl` seconds."""
    return {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "roles": list(roles),
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": new_jti(family),
    }


def own_issuer_config(config: IdpConfig, algorithms: tuple[str, ...]) -> IssuerConfig:
    """How the proxy's JWT validator must trust this identity provider.

    Its keys are the ring's verification keys (see `IdentityProvider.key_store`); the
    jwks_url is only where other services find them.
    """
    return IssuerConfig(
        issuer=config.issuer,
        audiences=(config.audience,),
        jwks_url=config.jwks_uri,
        algorithms=algorithms,
        roles_claim="roles",
        allow_insecure_http=config.issuer.startswith("http://"),
        # The IdP's own clock issues the tokens; a small leeway covers other workers' clocks.
        leeway=30,
    )
