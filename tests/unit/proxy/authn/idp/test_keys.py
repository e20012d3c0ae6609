"""Signing keys: RFC 7638 kids, the key file, rotation and the published JWKS."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from proxy.authn.idp.keys import (
    SigningKey,
    SigningKeyRing,
    jwk_thumbprint,
    main,
    read_key_file,
    rotate_key_file,
)
from proxy.authn.jwks import parse_jwks

# RFC 8037 appendix A.1 (the Ed25519 key) and A.3 (its RFC 7638 thumbprint).
RFC8037_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_kid_is_the_rfc_7638_thumbprint_of_the_rfc_8037_example_key() -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(_unb64(RFC8037_D))
    signing = SigningKey.from_private_key(key)
    assert signing.jwk["x"] == RFC8037_X
    assert signing.kid == RFC8037_THUMBPRINT
    assert signing.algorithm == "EdDSA"


def test_ec_thumbprint_ignores_kid_alg_and_use() -> None:
    signing = SigningKey.from_private_key(ec.generate_private_key(ec.SECP256R1()))
    assert signing.algorithm == "ES256"
    assert jwk_thumbprint(signing.jwk) == signing.kid
    assert len(_unb64(signing.jwk["x"])) == len(_unb64(signing.jwk["y"])) == 32


def test_other_curves_are_refused() -> None:
    with pytest.raises(ValueError, match="P-256"):
        SigningKey.from_private_key(ec.generate_private_key(ec.SECP384R1()))


def test_a_missing_key_file_is_created_private_with_one_key(tmp_path: Path) -> None:
    path = tmp_path / "idp" / "keys.pem"
    ring = SigningKeyRing.load(path, create_algorithm="ES256")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(ring.keys) == 1
    assert ring.active.algorithm == "ES256"
    # A second start (or another worker) reads the same key instead of making a new one.
    assert SigningKeyRing.load(path).active.kid == ring.active.kid
    assert list(path.parent.iterdir()) == [path]


def test_rotation_appends_a_signing_key_and_keeps_the_old_one_verifiable(tmp_path: Path) -> None:
    path = tmp_path / "keys.pem"
    old = SigningKeyRing.load(path)
    assert main(["rotate", str(path), "--algorithm", "ES256"]) == 0
    ring = SigningKeyRing.load(path)
    assert ring.keys[0].kid == old.active.kid
    assert ring.active.kid != old.active.kid
    assert ring.active.algorithm == "ES256"
    assert ring.algorithms == ("EdDSA", "ES256")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    published = {
        key.kid
        for key in parse_jwks(ring.jwks_document, allowed_algorithms=ring.algorithms, max_keys=10)[
            0
        ].keys
    }
    assert published == {old.active.kid, ring.active.kid}


def test_the_jwks_publishes_no_private_member(tmp_path: Path) -> None:
    path = tmp_path / "keys.pem"
    SigningKeyRing.load(path)
    rotate_key_file(path, "ES256")
    document = json.loads(SigningKeyRing.load(path).jwks_document)
    for entry in document["keys"]:
        assert set(entry) <= {"kty", "crv", "x", "y", "kid", "alg", "use"}
        assert entry["use"] == "sig"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a key",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
)
def test_unusable_key_files_are_refused_with_the_file_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "keys.pem"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"keys\.pem"):
        read_key_file(path)


def test_an_rsa_key_in_the_file_is_refused(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "keys.pem"
    path.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="not Ed25519 or P-256"):
        read_key_file(path)
