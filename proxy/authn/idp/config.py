"""Configuration of the sidecar's own identity provider: frozen, validated once at start.

The lead wires `IdpConfig` into the main configuration file (e.g. under `auth.idp`); every
field is documented here, where it is declared, so the configuration reference can be
generated from these declarations.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


Seconds = Annotated[int, msgspec.Meta(ge=1, le=10 * 365 * 86400)]


class LoginRateLimitConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Sliding-window limits on login attempts, shared by all workers through Redis."""

    per_user: Annotated[
        int,
        msgspec.Meta(ge=1, le=100_000),
        _doc("Login attempts allowed for one username within `window` (successful or not)."),
    ] = 10
    per_address: Annotated[
        int,
        msgspec.Meta(ge=1, le=1_000_000),
        _doc("Login attempts allowed from one client address within `window`."),
    ] = 50
    window: Annotated[
        Seconds, _doc("Length of the sliding window both limits count over (seconds).")
    ] = 300


class IdpConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The sidecar's own identity provider: users, signing keys, token lifetimes."""

    issuer: Annotated[
        str,
        _doc(
            "Public base URL of the identity provider, put in every token's `iss` and used to "
            "build the discovery and JWKS URLs (never the request's Host header). https://, "
            "or http:// on a loopback host only; no query, fragment or trailing slash."
        ),
    ]
    audience: Annotated[
        str, msgspec.Meta(min_length=1, max_length=256), _doc("The `aud` of issued tokens.")
    ]
    users_file: Annotated[
        str,
        _doc("YAML file of users (name, bcrypt password_hash, roles, disabled)."),
    ]
    key_file: Annotated[
        str,
        _doc(
            "PEM file of signing keys; created (mode 0600) with one new key when absent. The "
            "LAST key in the file signs, the others only verify (rotation: append a key, "
            "remove the old one once the tokens it signed have expired)."
        ),
    ] = "var/idp/signing-keys.pem"
    algorithm: Annotated[
        Literal["EdDSA", "ES256"],
        _doc("Key type generated when key_file is absent (Ed25519 or P-256)."),
    ] = "EdDSA"
    access_token_ttl: Annotated[
        Annotated[int, msgspec.Meta(ge=30, le=86400)],
        _doc("Lifetime of an access token (`exp - iat`, seconds)."),
    ] = 900
    refresh_idle_ttl: Annotated[
        Seconds,
        _doc("A refresh token not used within this long expires (seconds)."),
    ] = 30 * 86400
    refresh_absolute_ttl: Annotated[
        Seconds,
        _doc(
            "A login session (refresh token family) ends this long after the login, however "
            "often it was refreshed (seconds)."
        ),
    ] = 90 * 86400
    key_prefix: Annotated[
        str,
        msgspec.Meta(min_length=1, max_length=128),
        _doc("Prefix of every Redis key the identity provider writes."),
    ] = "lineage:idp:"
    rate_limit: Annotated[
        LoginRateLimitConfig, _doc("Login attempt limits per username and per client address.")
    ] = LoginRateLimitConfig()
    hash_threads: Annotated[
        int,
        msgspec.Meta(ge=1, le=64),
        _doc(
            "Threads that verify bcrypt passwords (deliberately slow), off the event loop. "
            "Also bounds the CPU a flood of logins can take."
        ),
    ] = 2
    max_pending_hashes: Annotated[
        int,
        msgspec.Meta(ge=1, le=100_000),
        _doc(
            "Password checks allowed to wait for a thread; a login beyond this is answered "
            "503 with Retry-After instead of queueing without bound."
        ),
    ] = 64

    def __post_init__(self) -> None:
        check_issuer_url(self.issuer)

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/.well-known/jwks.json"

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def mount_path(self) -> str:
        """Path under which the routes must be served (`""` when the issuer has none)."""
        return urlsplit(self.issuer).path


def check_issuer_url(issuer: str) -> None:
    """Raise ValueError unless `issuer` is a usable issuer identifier (OIDC Discovery 3)."""
    parts = urlsplit(issuer)
    if parts.scheme not in {"https", "http"} or not parts.hostname:
        raise ValueError(f"issuer {issuer!r} must be an absolute https:// URL")
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        raise ValueError(f"issuer {issuer!r}: http:// is allowed on loopback hosts only")
    if parts.query or parts.fragment or "?" in issuer or "#" in issuer:
        raise ValueError(f"issuer {issuer!r} must not have a query or fragment")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"issuer {issuer!r} must not carry credentials")
    if issuer.endswith("/"):
        raise ValueError(f"issuer {issuer!r} must not end with '/'")
