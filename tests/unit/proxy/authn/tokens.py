"""Keys, issuer configurations and token makers shared by the authn unit tests.

Well-formed tokens come from pyjwt; the ones pyjwt refuses to produce (alg none, duplicate
JSON members, r=s=0 signatures) are assembled by hand and signed with `cryptography`.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt as pyjwt
import msgspec
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from proxy.authn.jwt import IssuerConfig, IssuerKeys, StaticKeys, TrustedIssuers, VerificationKey

ISSUER = "https://idp.example.com/realms/corp"
AUDIENCE = "data-api"
SECRET = "s" * 40

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
# An attacker's own key pair, never published by the issuer.
ATTACKER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)

SIGNING_KEYS: dict[str, tuple[str, Any]] = {
    "RS256": ("rsa-1", RSA_KEY),
    "PS256": ("rsa-1", RSA_KEY),
    "ES256": ("ec-1", EC_KEY),
    "EdDSA": ("ed-1", ED_KEY),
}


def rsa_public_pem() -> bytes:
    return RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def issuer_config(**overrides: Any) -> IssuerConfig:
    fields: dict[str, Any] = {
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "jwks_url": "https://idp.example.com/jwks",
    }
    fields.update(overrides)
    return msgspec.convert(fields, IssuerConfig)


def issuer_keys() -> IssuerKeys:
    return IssuerKeys(
        [
            VerificationKey.from_public_key(RSA_KEY.public_key(), kid="rsa-1"),
            VerificationKey.from_public_key(EC_KEY.public_key(), kid="ec-1"),
            VerificationKey.from_public_key(ED_KEY.public_key(), kid="ed-1"),
        ]
    )


def trusted(*configs: IssuerConfig, max_token_bytes: int = 16 * 1024) -> TrustedIssuers:
    return TrustedIssuers(configs or (issuer_config(),), max_token_bytes=max_token_bytes)


def key_store() -> StaticKeys:
    return StaticKeys({ISSUER: issuer_keys()})


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims; an override of None removes the claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def sign(
    payload: dict[str, Any] | None = None,
    alg: str = "RS256",
    *,
    kid: str | None = "default",
    key: Any = None,
    headers: dict[str, Any] | None = None,
) -> str:
    default_kid, default_key = SIGNING_KEYS.get(alg, ("rsa-1", RSA_KEY))
    all_headers = dict(headers or {})
    if kid == "default":
        all_headers["kid"] = default_kid
    elif kid is not None:
        all_headers["kid"] = kid
    return pyjwt.encode(
        payload if payload is not None else claims(),
        key if key is not None else default_key,
        algorithm=alg,
        headers=all_headers,
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: str | bytes, payload: str | bytes, signature: bytes = b"") -> str:
    """Assemble a token from raw JSON texts without signing it."""
    header_bytes = header.encode() if isinstance(header, str) else header
    payload_bytes = payload.encode() if isinstance(payload, str) else payload
    return f"{b64(header_bytes)}.{b64(payload_bytes)}.{b64(signature)}"


def rs256_signed(header: str | bytes, payload: str | bytes, key: Any = RSA_KEY) -> str:
    """A correctly RS256-signed token over exactly these JSON texts (duplicates and all)."""
    header_bytes = header.encode() if isinstance(header, str) else header
    payload_bytes = payload.encode() if isinstance(payload, str) else payload
    signing_input = f"{b64(header_bytes)}.{b64(payload_bytes)}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def json_text(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def eddsa_signed(payload: dict[str, Any]) -> str:
    """An EdDSA token over any JSON payload, including claims pyjwt refuses to encode."""
    header = json_text({"alg": "EdDSA", "kid": "ed-1"})
    signing_input = f"{b64(header.encode())}.{b64(json_text(payload).encode())}"
    return f"{signing_input}.{b64(ED_KEY.sign(signing_input.encode()))}"
