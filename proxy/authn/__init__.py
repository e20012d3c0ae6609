"""Authentication: turn a request's credentials into a verified `Principal`, or refuse.

JWT bearer tokens: `TrustedIssuers` (configuration compiled once) + `validate()` (pure) +
`JwksCache` (keys, the IO edge) + `VerifiedTokenCache` (skip repeated verification).
"""

from proxy.authn.jwks import JwksCache, KeySetStatus
from proxy.authn.jwt import (
    IssuerConfig,
    IssuerKeys,
    KeyNotFound,
    KeyStore,
    StaticKeys,
    TrustedIssuers,
    VerificationKey,
    validate,
)
from proxy.authn.principal import AuthError, AuthMethod, Principal
from proxy.authn.tokencache import CacheStats, TokenCache, VerifiedTokenCache

__all__ = [
    "AuthError",
    "AuthMethod",
    "CacheStats",
    "IssuerConfig",
    "IssuerKeys",
    "JwksCache",
    "KeyNotFound",
    "KeySetStatus",
    "KeyStore",
    "Principal",
    "StaticKeys",
    "TokenCache",
    "TrustedIssuers",
    "VerificationKey",
    "VerifiedTokenCache",
    "validate",
]
