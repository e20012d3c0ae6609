"""JWKS documents and key files become key sets; dangerous or useless entries do not."""

from __future__ import annotations

import base64
import datetime
import json
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from proxy.authn.jwks import JwksCache, jwk_to_key, load_key_file, parse_jwks
from proxy.authn.jwt import DEFAULT_ALGORITHMS, StaticKeys, TrustedIssuers, validate
from proxy.authn.principal import AuthError
from tests.unit.proxy.authn.tokens import (
    EC_KEY,
    ED_KEY,
    ISSUER,
    RSA_KEY,
    SECRET,
    claims,
    issuer_config,
    rsa_public_pem,
    sign,
)


def _jwk(key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = pyjwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = pyjwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = pyjwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
    jwk.update(kid=kid, **extra)
    return jwk


def _jwks(*entries: Any) -> bytes:
    return json.dumps({"keys": list(entries)}).encode()


def _parse(document: bytes, max_keys: int = 32) -> Any:
    return parse_jwks(document, allowed_algorithms=DEFAULT_ALGORITHMS, max_keys=max_keys)


def test_a_jwks_of_rsa_ec_and_okp_keys_is_indexed_by_kid() -> None:
    keys, skipped = _parse(
        _jwks(_jwk(RSA_KEY, "r", alg="RS256", use="sig"), _jwk(EC_KEY, "e"), _jwk(ED_KEY, "d"))
    )
    assert skipped == ()
    assert [key.kid for key in keys.candidates("r")] == ["r"]
    assert keys.candidates("r")[0].algorithms == {"RS256"}
    assert keys.candidates("e")[0].algorithms == {"ES256"}
    assert keys.candidates("d")[0].algorithms == {"EdDSA"}
    assert keys.candidates("missing") == ()


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "kid": "h"}, "private"),
        ({**_jwk(RSA_KEY, "enc"), "use": "enc"}, "use"),
        ({**_jwk(RSA_KEY, "ops"), "key_ops": ["encrypt"]}, "key_ops"),
        ({**_jwk(RSA_KEY, "priv"), "d": "AQAB"}, "private"),
        ({**_jwk(RSA_KEY, "alg"), "alg": "HS256"}, "does not fit"),
        ({**_jwk(RSA_KEY, "x"), "kid": 7}, "kid"),
        ({"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"}, "unusable"),
        ({"kty": "XYZ", "kid": "x"}, "kty"),
        ("not an object", "object"),
    ],
)
def test_unsafe_or_unusable_entries_are_skipped_with_a_reason(entry: Any, why: str) -> None:
    keys, skipped = _parse(_jwks(entry, _jwk(EC_KEY, "good")))
    assert len(keys) == 1
    assert why in skipped[0]


def test_a_small_rsa_key_is_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="too small"):
        jwk_to_key(_jwk(weak, "weak"))


def test_keys_whose_algorithms_are_not_configured_are_skipped() -> None:
    keys, skipped = parse_jwks(
        _jwks(_jwk(RSA_KEY, "r"), _jwk(EC_KEY, "e")), allowed_algorithms=["ES256"], max_keys=8
    )
    assert [key.kid for key in keys.keys] == ["e"]
    assert "not allowed" in skipped[0]


@pytest.mark.parametrize(
    "document",
    [
        b"",
        b"[]",
        b'{"keys": {}}',
        b'{"keys": []}',
        b'{"keys": [], "keys": []}',
        b'{"keys": [{"kty": "oct", "k": "AAAA"}]}',
        b"\xff",
    ],
)
def test_documents_without_a_usable_key_are_refused(document: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each document fails for its own reason
        _parse(document)


def test_a_jwks_larger_than_the_key_limit_is_refused_whole() -> None:
    document = _jwks(*[_jwk(EC_KEY, f"k{i}") for i in range(5)])
    with pytest.raises(ValueError, match="more than the limit"):
        _parse(document, max_keys=4)


def test_key_file_may_be_a_pem_public_key(tmp_path: Path) -> None:
    path = tmp_path / "issuer.pem"
    path.write_bytes(rsa_public_pem())
    keys = load_key_file(issuer_config(jwks_url=None, key_file=str(path)))
    assert len(keys) == 1
    assert keys.candidates(None)[0].algorithms >= {"RS256", "PS256"}


def test_key_file_may_be_a_certificate(tmp_path: Path) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(EC_KEY.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(EC_KEY, hashes.SHA256())
    )
    path = tmp_path / "issuer.crt"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keys = load_key_file(issuer_config(jwks_url=None, key_file=str(path)))
    assert keys.candidates(None)[0].algorithms == {"ES256"}


def test_key_file_may_be_a_jwks(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(_jwks(_jwk(ED_KEY, "ed-1")))
    keys = load_key_file(issuer_config(jwks_url=None, key_file=str(path)))
    assert keys.candidates("ed-1")[0].algorithms == {"EdDSA"}


@pytest.mark.parametrize("content", [b"", b"garbage", b"-----BEGIN PUBLIC KEY-----\nAAAA\n"])
def test_unreadable_key_file_fails_at_start_naming_the_field(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="key_file"):
        load_key_file(issuer_config(jwks_url=None, key_file=str(path)))


def test_missing_key_file_fails_at_start_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key_file"):
        load_key_file(issuer_config(jwks_url=None, key_file=str(tmp_path / "absent.pem")))


async def test_cache_serves_static_issuers_without_any_fetch(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(_jwks(_jwk(ED_KEY, "ed-1"), _jwk(EC_KEY, "ec-1")))
    file_issuer = issuer_config(jwks_url=None, key_file=str(path))
    secret_issuer = issuer_config(issuer="https://sidecar", jwks_url=None, shared_secret=SECRET)
    cache = JwksCache([file_issuer, secret_issuer])
    issuers = TrustedIssuers([file_issuer, secret_issuer])
    await cache.start()
    try:
        assert (await cache.validate(sign(alg="EdDSA"), issuers)).issuer == ISSUER
        hs_token = pyjwt.encode(claims(iss="https://sidecar"), SECRET, algorithm="HS256")
        assert (await cache.validate(hs_token, issuers)).issuer == "https://sidecar"
        # A static key set has nothing to refresh: an unknown kid is a plain 401.
        with pytest.raises(AuthError) as caught:
            await cache.validate(sign(alg="RS256", kid="rsa-1"), issuers)
        assert (caught.value.reason, caught.value.status) == ("unknown_kid", 401)
        assert cache.fetch_attempts == 0
        assert {status.source for status in cache.status()} == {"static"}
    finally:
        await cache.close()


def _ec_key_with_short_x() -> ec.EllipticCurvePrivateKey:
    # About one P-256 key in 256 has an x coordinate with a leading zero byte.
    while True:
        key = ec.generate_private_key(ec.SECP256R1())
        if key.public_key().public_numbers().x < 2**248:
            return key


def _strip_leading_zeros(coordinate: str) -> str:
    raw = base64.urlsafe_b64decode(coordinate + "==").lstrip(b"\0")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_ec_coordinates_published_without_leading_zeros_still_verify() -> None:
    key = _ec_key_with_short_x()
    jwk = _jwk(key, "short")
    jwk["x"] = _strip_leading_zeros(jwk["x"])
    assert len(base64.urlsafe_b64decode(jwk["x"] + "==")) < 32
    keys, skipped = _parse(_jwks(jwk))
    assert skipped == ()
    token = sign(alg="ES256", kid="short", key=key)
    assert (
        validate(token, TrustedIssuers([issuer_config()]), StaticKeys({ISSUER: keys})).id == "alice"
    )


def test_ec_points_off_the_curve_or_too_wide_are_refused() -> None:
    off_curve = _jwk(EC_KEY, "off")
    off_curve["y"] = off_curve["x"]
    too_wide = _jwk(EC_KEY, "wide")
    too_wide["x"] = base64.urlsafe_b64encode(b"\1" * 33).rstrip(b"=").decode()
    for entry in (off_curve, too_wide):
        with pytest.raises(ValueError, match="unusable"):
            jwk_to_key(entry)
