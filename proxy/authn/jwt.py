"""JWT validation: a pure function from (token, trusted issuers, keys) to a `Principal`.

`validate()` does no IO. It promises that a token is accepted only when all of this holds:
- it is at most `max_token_bytes` long (checked before any decoding), has exactly three
  canonical base64url segments, and its header and payload are JSON objects without
  duplicate keys (pyjwt keeps the last duplicate silently, so the segments are decoded and
  parsed here first, strictly);
- its `iss` names a configured issuer, and its `alg` is on that issuer's allow-list;
  `none` (any casing) is never on a list, and `crit` extensions are refused;
- the key is chosen by `kid` from the issuer's key set only; `jku`, `x5u`, `jwk` and `x5c`
  headers are ignored, never fetched, never trusted. A token without `kid` is accepted only
  when the issuer has exactly one key; a key without a kid (a PEM key file) serves any
  token of its issuer only when it is that issuer's single key;
- the algorithm is compatible with the key type: the set of algorithms a key may verify is
  derived from the key object itself (an RSA key allows only RS*/PS*, an HMAC secret only
  HS*), so HS/RS confusion cannot be expressed;
- `exp`, `iss`, `aud`, `iat` (and configured claims) are present; `exp`, `nbf`, `iat` hold
  with the issuer's bounded leeway; `aud` names an allowed audience;
- pyjwt verifies the signature with exactly that key and algorithm and re-checks the claims.
Every refusal is an `AuthError` (401, or 503 when no keys are loaded for the issuer).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Protocol
from urllib.parse import urlsplit

import jwt as pyjwt
import msgspec
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from proxy.authn.principal import AuthError, Principal, require_unicode

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS | frozenset(EC_ALGORITHMS.values()) | {"EdDSA"}
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA", "PS256")
DEFAULT_HMAC_ALGORITHMS = ("HS256",)
# Always required, whatever the configuration says: pyjwt would otherwise accept a token
# that simply omits them.
MANDATORY_CLAIMS = ("exp", "iss", "aud", "iat")
DEFAULT_MAX_TOKEN_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
MIN_SHARED_SECRET_BYTES = 32
MAX_KID_CHARS = 256
MAX_PRINCIPAL_ID_CHARS = 1024
# Year 33658; later (or infinite, or NaN) dates are malformed rather than "far future".
MAX_DATE = 10**12

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class IssuerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One trusted token issuer and how its tokens map to a principal."""

    issuer: Annotated[
        str, msgspec.Meta(min_length=1), _doc("The exact `iss` value this issuer puts in tokens.")
    ]
    audiences: Annotated[
        tuple[str, ...],
        msgspec.Meta(min_length=1),
        _doc("Accepted `aud` values; a token must name at least one. Required."),
    ]
    jwks_url: Annotated[
        str | None, _doc("JWKS endpoint (https). One of jwks_url, discovery_url, key_file.")
    ] = None
    discovery_url: Annotated[
        str | None,
        _doc(
            "OIDC discovery document (`.../.well-known/openid-configuration`); its `jwks_uri` "
            "is used and its `issuer` must equal `issuer`."
        ),
    ] = None
    key_file: Annotated[
        str | None,
        _doc("Local verification keys: a PEM public key or certificate, or a JWKS JSON file."),
    ] = None
    shared_secret: Annotated[
        str | None,
        _doc(
            "HMAC secret (resolved value of a file:/env: reference, at least 32 bytes). When "
            "set, this issuer accepts ONLY HS* algorithms and no other key source is allowed."
        ),
    ] = None
    algorithms: Annotated[
        tuple[str, ...] | None,
        _doc(
            "Allowed `alg` values. Default RS256, ES256, EdDSA, PS256 (HS256 for a "
            "shared_secret issuer). Never `none`; HS* only with shared_secret."
        ),
    ] = None
    leeway: Annotated[
        int,
        msgspec.Meta(ge=0, le=300),
        _doc("Clock skew tolerated for exp, nbf and iat (seconds, at most 300)."),
    ] = 30
    required_claims: Annotated[
        tuple[str, ...],
        _doc("Claims that must be present in addition to exp, iss, aud, iat (always required)."),
    ] = ()
    principal_claim: Annotated[str, _doc("Claim (dotted path) holding the principal id.")] = "sub"
    roles_claim: Annotated[
        str | None,
        _doc("Claim (dotted path, e.g. `realm_access.roles`) holding roles: a list or a string."),
    ] = None
    groups_claim: Annotated[str | None, _doc("Claim (dotted path) holding groups.")] = None
    email_claim: Annotated[str, _doc("Claim (dotted path) holding the email address.")] = "email"
    scopes_claim: Annotated[
        str, _doc("Claim holding OAuth2 scopes: a space-separated string or a list (`scp`).")
    ] = "scope"
    allowed_email_domains: Annotated[
        tuple[str, ...],
        _doc(
            "When not empty, the email claim is required, must have exactly one `@`, and its "
            "domain must equal one of these (no subdomain matching)."
        ),
    ] = ()
    require_email_verified: Annotated[
        bool,
        _doc(
            "Pass the email on (identity header) only when the token says `email_verified: "
            "true`; with allowed_email_domains, refuse tokens without it. false: for issuers "
            "that never send email_verified (Azure AD), trusting their email claim as is."
        ),
    ] = True
    allow_insecure_http: Annotated[
        bool, _doc("Allow http:// key URLs. For tests on loopback only.")
    ] = False
    jwks_refresh_interval: Annotated[
        float,
        msgspec.Meta(ge=10, le=86400),
        _doc("How often the key set is fetched again in the background (seconds)."),
    ] = 300.0
    jwks_min_refresh_interval: Annotated[
        float,
        msgspec.Meta(ge=1, le=3600),
        _doc(
            "At most one fetch per this many seconds when a token names an unknown kid, so "
            "random kids cannot cause a fetch storm (seconds)."
        ),
    ] = 30.0
    jwks_fetch_timeout: Annotated[
        float,
        msgspec.Meta(gt=0, le=60),
        _doc("Whole-request timeout of one discovery or JWKS fetch (seconds)."),
    ] = 5.0
    jwks_max_keys: Annotated[
        int, msgspec.Meta(ge=1, le=1000), _doc("A JWKS with more keys is refused.")
    ] = 32
    jwks_max_bytes: Annotated[
        int,
        msgspec.Meta(ge=1024, le=16 * 1024 * 1024),
        _doc("A discovery or JWKS document larger than this is refused (bytes)."),
    ] = 256 * 1024

    def __post_init__(self) -> None:
        sources = [self.jwks_url, self.discovery_url, self.key_file, self.shared_secret]
        if sum(source is not None for source in sources) != 1:
            raise ValueError(
                f"issuer {self.issuer!r}: set exactly one of jwks_url, discovery_url, "
                "key_file, shared_secret"
            )
        if self.jwks_min_refresh_interval > self.jwks_refresh_interval:
            raise ValueError(
                f"issuer {self.issuer!r}: jwks_min_refresh_interval "
                f"({self.jwks_min_refresh_interval:g} s) is longer than jwks_refresh_interval "
                f"({self.jwks_refresh_interval:g} s)"
            )
        for name in ("jwks_url", "discovery_url"):
            url = getattr(self, name)
            if url is not None:
                check_key_url(url, self.allow_insecure_http, what=name)
        if self.shared_secret is not None:
            if not set(self.effective_algorithms) <= HMAC_ALGORITHMS:
                raise ValueError("algorithms: a shared_secret issuer allows only HS256/384/512")
            # RFC 7518 3.2: the secret must be at least as long as the hash output.
            needed = max(int(alg[2:]) // 8 for alg in self.effective_algorithms or ("HS256",))
            if len(self.shared_secret.encode()) < needed:
                raise ValueError(f"shared_secret must be at least {needed} bytes")
        elif not set(self.effective_algorithms) <= ASYMMETRIC_ALGORITHMS:
            raise ValueError(
                f"algorithms: must be among {sorted(ASYMMETRIC_ALGORITHMS)} "
                "(HS* needs shared_secret; none is never allowed)"
            )
        if not self.effective_algorithms:
            raise ValueError("algorithms: must not be empty")
        if any(domain != domain.lower() or "@" in domain for domain in self.allowed_email_domains):
            raise ValueError("allowed_email_domains: give lower-case domains without @")

    def __repr__(self) -> str:
        # The default repr would print shared_secret into logs.
        return f"IssuerConfig(issuer={self.issuer!r}, audiences={self.audiences!r})"

    @property
    def effective_algorithms(self) -> tuple[str, ...]:
        if self.algorithms is not None:
            return self.algorithms
        return DEFAULT_HMAC_ALGORITHMS if self.shared_secret is not None else DEFAULT_ALGORITHMS


def check_key_url(url: str, allow_insecure_http: bool, *, what: str) -> None:
    """Raise ValueError unless `url` is an absolute https URL (http only when allowed)."""
    parts = urlsplit(url)
    allowed = {"https", "http"} if allow_insecure_http else {"https"}
    if parts.scheme not in allowed or not parts.hostname:
        raise ValueError(f"{what}: {url!r} must be an absolute https:// URL")


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A verification key and the algorithms its type permits (never chosen by a token)."""

    kid: str | None
    material: PublicKey | bytes
    algorithms: frozenset[str]

    @classmethod
    def from_public_key(
        cls, public_key: object, kid: str | None = None, alg: str | None = None
    ) -> VerificationKey:
        """Wrap an asymmetric public key; `alg` (a JWK's `alg`) narrows it to one algorithm."""
        if isinstance(public_key, rsa.RSAPublicKey):
            if public_key.key_size < MIN_RSA_BITS:
                raise ValueError(f"RSA key of {public_key.key_size} bits is too small")
            family = RSA_ALGORITHMS
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            curve_alg = EC_ALGORITHMS.get(public_key.curve.name)
            if curve_alg is None:
                raise ValueError(f"EC curve {public_key.curve.name} is not supported")
            family = frozenset({curve_alg})
        elif isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            family = frozenset({"EdDSA"})
        else:
            raise ValueError(f"{type(public_key).__name__} is not a supported public key")
        if alg is not None:
            if alg not in family:
                raise ValueError(f"alg {alg!r} does not fit the key type")
            family = frozenset({alg})
        return cls(kid=kid, material=public_key, algorithms=family)

    @classmethod
    def from_shared_secret(cls, secret: bytes, kid: str | None = None) -> VerificationKey:
        if len(secret) < MIN_SHARED_SECRET_BYTES:
            raise ValueError(f"shared secret must be at least {MIN_SHARED_SECRET_BYTES} bytes")
        return cls(kid=kid, material=secret, algorithms=HMAC_ALGORITHMS)


class IssuerKeys:
    """The keys of one issuer, indexed by kid. Immutable once built."""

    __slots__ = ("_by_kid", "keys")

    def __init__(self, keys: Iterable[VerificationKey]) -> None:
        self.keys = tuple(keys)
        by_kid: dict[str, list[VerificationKey]] = {}
        for key in self.keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
        self._by_kid = {kid: tuple(group) for kid, group in by_kid.items()}

    def __len__(self) -> int:
        return len(self.keys)

    def has_kid(self, kid: str) -> bool:
        return kid in self._by_kid

    def candidates(self, kid: str | None) -> tuple[VerificationKey, ...]:
        """Keys that may verify a token with this kid (a plain dict lookup, nothing else)."""
        if kid is not None:
            found = self._by_kid.get(kid)
            if found is not None:
                return found
        if len(self.keys) == 1 and (kid is None or self.keys[0].kid is None):
            return self.keys
        return ()


class KeyStore(Protocol):
    """Where `validate()` finds an issuer's keys. `JwksCache` is the production one."""

    def keys_for(self, issuer: str) -> IssuerKeys | None: ...


class StaticKeys:
    """A fixed KeyStore, for key files, shared secrets and tests."""

    def __init__(self, keys: Mapping[str, IssuerKeys]) -> None:
        self._keys = dict(keys)

    def keys_for(self, issuer: str) -> IssuerKeys | None:
        return self._keys.get(issuer)


class KeyNotFound(AuthError):
    """No key of the issuer matches the token's kid; a key-set refresh may find it."""

    def __init__(self, issuer: str, kid: str | None, *, status: int = 401) -> None:
        reason = "unknown_kid" if status == 401 else "keys_unavailable"
        super().__init__(reason, status, detail=f"issuer={issuer!r} kid={kid!r}")
        self.issuer = issuer
        self.kid = kid


class DuplicateKeyError(ValueError):
    """A JSON object names the same member twice."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise DuplicateKeyError("an object names the same member twice")
    return obj


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json_object(data: bytes) -> dict[str, Any]:
    """Parse UTF-8 JSON that must be an object; duplicates, NaN and Infinity raise ValueError."""
    try:
        value = json.loads(
            data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants
        )
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError("JSON value is not an object")
    return value


_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def _b64url_json(segment: str, name: str) -> dict[str, Any]:
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise AuthError("malformed_token", detail=f"{name} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except binascii.Error:
        raise AuthError("malformed_token", detail=f"{name} is not base64url") from None
    # Non-canonical encodings (stray low bits) would give one token several spellings.
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment.encode("ascii"):
        raise AuthError("malformed_token", detail=f"{name} is not canonical base64url")
    try:
        return strict_json_object(raw)
    except DuplicateKeyError as exc:
        raise AuthError("duplicate_json_key", detail=f"{name}: {exc}") from None
    except ValueError as exc:
        raise AuthError("malformed_token", detail=f"{name}: {exc}") from None


def _claim_path(path: str) -> tuple[str, tuple[str, ...]]:
    return path, tuple(path.split("."))


def _claim_at(payload: Mapping[str, Any], path: tuple[str, tuple[str, ...]]) -> Any:
    # A literal top-level name wins, so namespaced claims such as
    # "https://example.com/roles" work although they contain dots.
    literal, parts = path
    if literal in payload:
        return payload[literal]
    value: Any = payload
    for part in parts:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


@dataclass(frozen=True, slots=True)
class CompiledIssuer:
    """An IssuerConfig compiled once, so that validate() does no per-request setup."""

    issuer: str
    audiences: frozenset[str]
    audience_list: list[str]
    algorithms: frozenset[str]
    leeway: int
    required: tuple[str, ...]
    pyjwt_options: pyjwt.types.Options
    principal_path: tuple[str, tuple[str, ...]]
    roles_path: tuple[str, tuple[str, ...]] | None
    groups_path: tuple[str, tuple[str, ...]] | None
    email_path: tuple[str, tuple[str, ...]]
    scopes_path: tuple[str, tuple[str, ...]]
    email_domains: frozenset[str]
    require_email_verified: bool


def _compile(config: IssuerConfig) -> CompiledIssuer:
    required = tuple(dict.fromkeys((*MANDATORY_CLAIMS, *config.required_claims)))
    options: pyjwt.types.Options = {
        "require": list(required),
        "verify_signature": True,
        "verify_exp": True,
        "verify_nbf": True,
        "verify_iat": True,
        "verify_aud": True,
        "verify_iss": True,
        "enforce_minimum_key_length": True,
    }
    return CompiledIssuer(
        issuer=config.issuer,
        audiences=frozenset(config.audiences),
        audience_list=list(config.audiences),
        algorithms=frozenset(config.effective_algorithms),
        leeway=config.leeway,
        required=required,
        pyjwt_options=options,
        principal_path=_claim_path(config.principal_claim),
        roles_path=_claim_path(config.roles_claim) if config.roles_claim else None,
        groups_path=_claim_path(config.groups_claim) if config.groups_claim else None,
        email_path=_claim_path(config.email_claim),
        scopes_path=_claim_path(config.scopes_claim),
        email_domains=frozenset(config.allowed_email_domains),
        require_email_verified=config.require_email_verified,
    )


class TrustedIssuers:
    """The configured issuers, compiled once at start. `fingerprint` names this exact
    configuration, so a verified-token cache entry made under it never serves another."""

    def __init__(
        self, configs: Sequence[IssuerConfig], *, max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES
    ) -> None:
        if not 256 <= max_token_bytes <= 1024 * 1024:
            raise ValueError("max_token_bytes must be between 256 and 1048576")
        self.configs = tuple(configs)
        self.max_token_bytes = max_token_bytes
        self._rules: dict[str, CompiledIssuer] = {}
        for config in self.configs:
            if config.issuer in self._rules:
                raise ValueError(f"issuer {config.issuer!r} is configured twice")
            self._rules[config.issuer] = _compile(config)
        identity = msgspec.json.encode([list(self.configs), max_token_bytes])
        self.fingerprint = hashlib.sha256(identity).hexdigest()

    def rules_for(self, issuer: object) -> CompiledIssuer:
        rules = self._rules.get(issuer) if isinstance(issuer, str) else None
        if rules is None:
            raise AuthError("untrusted_issuer", detail=f"iss={str(issuer)[:200]!r}")
        return rules


def validate(token: str, issuers: TrustedIssuers, keys: KeyStore) -> Principal:
    """Verify `token` and map it to a Principal, or raise AuthError. No IO."""
    if len(token) > issuers.max_token_bytes:
        raise AuthError("token_too_large", detail=f"{len(token)} > {issuers.max_token_bytes}")
    if not token.isascii():
        raise AuthError("malformed_token", detail="token is not ASCII")
    segments = token.split(".")
    if len(segments) != 3:
        reason = "encrypted_token_unsupported" if len(segments) == 5 else "malformed_token"
        raise AuthError(reason, detail=f"{len(segments)} segments, expected 3")
    if not segments[2]:
        raise AuthError("missing_signature")
    header = _b64url_json(segments[0], "header")
    payload = _b64url_json(segments[1], "payload")
    alg = _check_header(header)
    rules = issuers.rules_for(payload.get("iss"))
    if alg not in rules.algorithms:
        raise AuthError("algorithm_not_allowed", detail=f"alg={alg[:20]!r}")
    # Claims first: they are cheap, and an expired token must not cost a key refresh.
    _check_claims(payload, rules, time.time())
    key = _select_key(keys, rules.issuer, header.get("kid"), alg)
    _verify_with_pyjwt(token, key, alg, rules)
    return _principal(payload, rules)


def _check_header(header: Mapping[str, Any]) -> str:
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise AuthError("malformed_token", detail="header has no alg string")
    if alg.strip().lower() == "none":
        raise AuthError("unsigned_token", detail="alg none is never accepted")
    if "crit" in header:
        # No JWS extension is understood here, so any critical one must be refused.
        raise AuthError("unsupported_critical_header")
    if "b64" in header:
        raise AuthError("unsupported_header", detail="b64")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_CHARS):
        raise AuthError("malformed_kid")
    return alg


def _numeric_date(payload: Mapping[str, Any], claim: str) -> float | None:
    value = payload.get(claim)
    if value is None:
        return None
    # Bounded before any float conversion: JSON integers are unbounded, and a float
    # conversion of 10**400 would raise instead of refusing.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not -MAX_DATE <= value <= MAX_DATE
    ):
        raise AuthError("malformed_claim", detail=f"{claim} is not a NumericDate")
    return float(value)


def _check_claims(payload: Mapping[str, Any], rules: CompiledIssuer, now: float) -> None:
    for claim in rules.required:
        if payload.get(claim) is None:
            raise AuthError("missing_claim", detail=claim)
    aud = payload["aud"]
    token_audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(token_audiences, list) or not all(
        isinstance(item, str) for item in token_audiences
    ):
        raise AuthError("malformed_claim", detail="aud")
    if rules.audiences.isdisjoint(token_audiences):
        raise AuthError("wrong_audience")
    exp = _numeric_date(payload, "exp")
    nbf = _numeric_date(payload, "nbf")
    iat = _numeric_date(payload, "iat")
    if exp is not None and exp <= now - rules.leeway:
        raise AuthError("token_expired")
    if nbf is not None and nbf > now + rules.leeway:
        raise AuthError("token_not_yet_valid")
    if iat is not None and iat > now + rules.leeway:
        raise AuthError("issued_in_future")


def _select_key(keys: KeyStore, issuer: str, kid: str | None, alg: str) -> VerificationKey:
    issuer_keys = keys.keys_for(issuer)
    if issuer_keys is None:
        raise KeyNotFound(issuer, kid, status=503)
    candidates = issuer_keys.candidates(kid)
    if not candidates:
        if kid is None:
            raise AuthError("kid_required", detail=f"issuer {issuer!r} has several keys")
        raise KeyNotFound(issuer, kid)
    for key in candidates:
        if alg in key.algorithms:
            return key
    raise AuthError("algorithm_key_mismatch", detail=f"alg={alg!r} kid={kid!r}")


def _verify_with_pyjwt(token: str, key: VerificationKey, alg: str, rules: CompiledIssuer) -> None:
    try:
        pyjwt.decode(
            token,
            key=key.material,
            algorithms=[alg],
            audience=rules.audience_list,
            issuer=rules.issuer,
            leeway=rules.leeway,
            options=rules.pyjwt_options,
        )
    except pyjwt.InvalidSignatureError:
        raise AuthError("bad_signature") from None
    except pyjwt.ExpiredSignatureError:
        raise AuthError("token_expired") from None
    except pyjwt.PyJWTError as exc:
        raise AuthError("invalid_token", detail=str(exc)[:200]) from None
    except (ValueError, TypeError) as exc:
        # Key or signature shapes that cryptography refuses outright.
        raise AuthError("bad_signature", detail=type(exc).__name__) from None


def _string_tuple(value: Any, claim: str, *, split: bool = False) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(value.split()) if split else (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise AuthError("malformed_claim", detail=f"{claim} must be a string or list of strings")


_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_EMAIL_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")


def email_domain(address: str) -> str | None:
    """The lower-cased domain of a plain `local@domain` address, or None if it is not one.

    Strict on purpose: exactly one `@`, a dot-atom local part, an ASCII DNS domain. So
    `a@evil.com@corp.com`, quoted local parts and trailing dots all give None.
    """
    if len(address) > 254 or address.count("@") != 1:
        return None
    local, domain = address.split("@")
    domain = domain.lower()
    if len(local) > 64 or not _EMAIL_LOCAL.fullmatch(local) or not _EMAIL_DOMAIN.fullmatch(domain):
        return None
    return domain


def _principal(payload: Mapping[str, Any], rules: CompiledIssuer) -> Principal:
    principal_id = _claim_at(payload, rules.principal_path)
    if not isinstance(principal_id, str) or not 0 < len(principal_id) <= MAX_PRINCIPAL_ID_CHARS:
        raise AuthError("malformed_claim", detail=f"{rules.principal_path[0]} is not an id")
    email_value = _claim_at(payload, rules.email_path)
    email = email_value if isinstance(email_value, str) else None
    domain = email_domain(email) if email is not None else None
    if domain is None:
        email = None
    verified = payload.get("email_verified") is True
    if rules.email_domains:
        if domain is None or domain not in rules.email_domains:
            raise AuthError("email_domain_not_allowed")
        if rules.require_email_verified and not verified:
            raise AuthError("email_not_verified")
    if rules.require_email_verified and not verified:
        # An address the issuer does not vouch for is no identity: it is not passed on (the
        # identity header promises a verified email, as oauth2-proxy's does).
        email = None
    token_id = payload.get("jti")
    return require_unicode(
        Principal(
            id=principal_id,
            issuer=rules.issuer,
            auth_method="jwt",
            roles=_string_tuple(
                _claim_at(payload, rules.roles_path) if rules.roles_path else None, "roles"
            ),
            groups=_string_tuple(
                _claim_at(payload, rules.groups_path) if rules.groups_path else None, "groups"
            ),
            email=email,
            scopes=_string_tuple(_claim_at(payload, rules.scopes_path), "scopes", split=True),
            token_id=token_id if isinstance(token_id, str) else None,
            expires_at=float(payload["exp"]),
        )
    )
