"""Signing keys of the sidecar's own identity provider.

Promises:
- keys live in one PEM file of private keys (Ed25519 for EdDSA, P-256 for ES256). The LAST
  key signs; every key in the file verifies and is published in the JWKS, so after a
  rotation (`python -m proxy.authn.idp.keys rotate FILE` appends a key) tokens signed by
  the old key stay valid until they expire. Remove an old key only after
  `access_token_ttl` has passed;
- a missing file is created with one new key, mode 0600, atomically: several workers that
  start together all end up with the same key;
- every key's `kid` is its RFC 7638 JWK thumbprint (SHA-256), so it names the key material
  itself and cannot collide by accident;
- the JWKS holds public members only.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from proxy.authn.jwt import IssuerKeys, VerificationKey

log = logging.getLogger(__name__)

Algorithm = Literal["EdDSA", "ES256"]
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

_PEM_BLOCK = re.compile(
    rb"-----BEGIN (?P<label>[A-Z ]+)-----\r?\n.*?-----END (?P=label)-----", re.DOTALL
)
# Members that define each key type's thumbprint (RFC 7638 section 3.2).
_THUMBPRINT_MEMBERS = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y")}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(public_key: PublicKey) -> dict[str, str]:
    """The public JWK members of a key (no kid, alg or use)."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == "secp256r1":
        numbers = public_key.public_numbers()
        # RFC 7518 6.2.1.2: coordinates are full width, leading zeros kept.
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64url(numbers.x.to_bytes(32, "big")),
            "y": _b64url(numbers.y.to_bytes(32, "big")),
        }
    raise ValueError(f"{type(public_key).__name__} is not an Ed25519 or P-256 key")


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 SHA-256 thumbprint of an OKP or EC public JWK, base64url."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty", ""))
    if members is None:
        raise ValueError(f"no thumbprint rule for kty {jwk.get('kty')!r}")
    canonical = json.dumps(
        {name: jwk[name] for name in members}, separators=(",", ":"), sort_keys=True
    )
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key with its algorithm, kid and public JWK, derived once."""

    kid: str
    algorithm: Algorithm
    private_key: PrivateKey
    jwk: Mapping[str, str]

    @classmethod
    def from_private_key(cls, private_key: object) -> SigningKey:
        algorithm: Algorithm
        if isinstance(private_key, ed25519.Ed25519PrivateKey):
            algorithm = "EdDSA"
        elif isinstance(private_key, ec.EllipticCurvePrivateKey):
            if private_key.curve.name != "secp256r1":
                raise ValueError(f"EC curve {private_key.curve.name} is not P-256")
            algorithm = "ES256"
        else:
            raise ValueError(f"{type(private_key).__name__} is not an Ed25519 or P-256 key")
        members = public_jwk(private_key.public_key())
        kid = jwk_thumbprint(members)
        jwk = {**members, "kid": kid, "alg": algorithm, "use": "sig"}
        return cls(kid=kid, algorithm=algorithm, private_key=private_key, jwk=jwk)

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r}, algorithm={self.algorithm!r})"


class SigningKeyRing:
    """All keys of the issuer: the last one signs, all of them verify."""

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        kids = [key.kid for key in keys]
        if len(set(kids)) != len(kids):
            raise ValueError("the same key is listed twice")
        self.keys = tuple(keys)
        self.active = keys[-1]
        self.algorithms = tuple(dict.fromkeys(key.algorithm for key in keys))
        # Serialised once: the JWKS is constant for the life of the ring.
        self.jwks_document = json.dumps(
            {"keys": [dict(key.jwk) for key in self.keys]}, separators=(",", ":")
        ).encode("utf-8")
        self.verification_keys = IssuerKeys(
            VerificationKey.from_public_key(
                key.private_key.public_key(), kid=key.kid, alg=key.algorithm
            )
            for key in self.keys
        )

    @classmethod
    def load(cls, path: str | Path, *, create_algorithm: Algorithm = "EdDSA") -> SigningKeyRing:
        """Read the key file, creating it with one `create_algorithm` key when absent."""
        path = Path(path)
        if not path.exists():
            create_key_file(path, create_algorithm)
        return cls([SigningKey.from_private_key(key) for key in read_key_file(path)])

    def sign(self, claims: Mapping[str, Any]) -> str:
        """A compact JWS of `claims` by the active key, with its kid in the header."""
        active = self.active
        return pyjwt.encode(
            dict(claims),
            active.private_key,
            algorithm=active.algorithm,
            headers={"kid": active.kid, "typ": "JWT"},
        )


def generate_key(algorithm: Algorithm) -> PrivateKey:
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def read_key_file(path: Path) -> list[PrivateKey]:
    """Every private key in a PEM file, in file order; ValueError names the problem."""
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"key_file {str(path)!r}: {exc.strerror}") from None
    if mode & 0o077:
        log.warning("key_file %s is readable by other users (mode %o)", path, mode & 0o777)
    keys: list[PrivateKey] = []
    for number, block in enumerate(_PEM_BLOCK.finditer(data), start=1):
        try:
            key = serialization.load_pem_private_key(block.group(0), password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"key_file {str(path)!r}: key {number}: {exc}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError(f"key_file {str(path)!r}: key {number} is not Ed25519 or P-256")
        keys.append(key)
    if not keys:
        raise ValueError(f"key_file {str(path)!r} holds no PEM private key")
    return keys


def _write_private(path: Path, content: bytes, *, replace: bool) -> None:
    # Written to a 0600 temporary file in the same folder, then linked (create) or renamed
    # (replace) into place, so no reader ever sees a half-written key file.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".keys-")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            # If another worker created it first, its key is the one everyone uses.
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
    finally:
        if Path(temporary).exists():
            os.unlink(temporary)


def create_key_file(path: Path, algorithm: Algorithm) -> None:
    """Create `path` (0600) with one new key, unless it already exists."""
    _write_private(path, _pem(generate_key(algorithm)), replace=False)
    log.warning("created signing key file %s with a new %s key", path, algorithm)


def rotate_key_file(path: Path, algorithm: Algorithm) -> SigningKey:
    """Append a new key to the file; it becomes the signing key at the next start."""
    existing = read_key_file(path) if path.exists() else []
    new_key = generate_key(algorithm)
    _write_private(path, b"".join(_pem(key) for key in [*existing, new_key]), replace=True)
    return SigningKey.from_private_key(new_key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.authn.idp.keys", description="Manage the IdP's signing key file."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    rotate = commands.add_parser("rotate", help="append a new signing key (used after restart)")
    rotate.add_argument("key_file", type=Path)
    rotate.add_argument("--algorithm", choices=["EdDSA", "ES256"], default="EdDSA")
    arguments = parser.parse_args(argv)
    try:
        key = rotate_key_file(arguments.key_file, arguments.algorithm)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"added key {key.kid} ({key.algorithm}) to {arguments.key_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
