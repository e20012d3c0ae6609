"""Access-token claims and refresh-token shapes: what the identity provider issues."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.authn.idp.config import IdpConfig
from proxy.authn.idp.keys import SigningKey, SigningKeyRing, generate_key, rotate_key_file
from proxy.authn.idp.tokens import (
    access_claims,
    family_of_jti,
    new_family_id,
    new_refresh_token,
    own_issuer_config,
    parse_refresh_token,
    refresh_token_digest,
)
from proxy.authn.jwt import StaticKeys, TrustedIssuers, validate
from proxy.authn.principal import AuthError

ISSUER = "https://sidecar.example.com/idp"


def idp_config(**overrides: object) -> IdpConfig:
    fields: dict[str, object] = {
        "issuer": ISSUER,
        "audience": "data-api",
        "users_file": "users.yaml",
    }
    fields.update(overrides)
    return msgspec.convert(fields, IdpConfig)


def ring(*algorithms: str) -> SigningKeyRing:
    return SigningKeyRing(
        [SigningKey.from_private_key(generate_key(alg)) for alg in algorithms]  # type: ignore[arg-type]
    )


def test_refresh_tokens_are_256_random_bits_with_a_prefix() -> None:
    tokens = {new_refresh_token() for _ in range(50)}
    assert len(tokens) == 50
    for token in tokens:
        assert token.startswith("lsrt_")
        assert len(token) == 5 + 43
        assert parse_refresh_token(token) == token


def test_only_the_digest_of_a_refresh_token_is_kept_and_it_differs_per_token() -> None:
    token = new_refresh_token()
    digest = refresh_token_digest(token)
    assert len(digest) == 64
    assert token[5:] not in digest
    assert refresh_token_digest(new_refresh_token()) != digest


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        b"lsrt_",
        "",
        "lsrt_",
        "lsrt_" + "A" * 42,
        "lsrt_" + "A" * 44,
        "LSRT_" + "A" * 43,
        "lsrt_" + "A" * 42 + "=",
        "lsrt_" + "A" * 42 + "\x00",
        " lsrt_" + "A" * 43,
        # The last character carries 2 unused bits; "B" sets one of them.
        "lsrt_" + "A" * 42 + "B",
    ],
)
def test_malformed_refresh_tokens_are_refused(value: object) -> None:
    assert parse_refresh_token(value) is None


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_change_to_a_refresh_token_is_refused_or_names_another_digest(
    data: st.DataObject,
) -> None:
    token = new_refresh_token()
    position = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.text(min_size=0, max_size=3))
    tampered = token[:position] + replacement + token[position + 1 :]
    if tampered == token:
        return
    parsed = parse_refresh_token(tampered)
    assert parsed is None or refresh_token_digest(parsed) != refresh_token_digest(token)


def test_the_jti_names_the_family_and_nothing_else_parses() -> None:
    family = new_family_id()
    claims = access_claims(
        issuer=ISSUER, audience="a", subject="alice", roles=(), family=family, now=1, ttl=60
    )
    assert family_of_jti(claims["jti"]) == family
    assert family_of_jti(None) is None
    assert family_of_jti(family) is None
    assert family_of_jti(claims["jti"] + "x") is None
    assert family_of_jti("../" + claims["jti"][3:]) is None


def test_access_claims_carry_issuer_audience_subject_roles_and_lifetime() -> None:
    claims = access_claims(
        issuer=ISSUER,
        audience="data-api",
        subject="alice",
        roles=("analyst", "admin"),
        family=new_family_id(),
        now=1_000,
        ttl=900,
    )
    assert claims["iss"] == ISSUER
    assert claims["aud"] == "data-api"
    assert claims["sub"] == "alice"
    assert claims["roles"] == ["analyst", "admin"]
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (1_000, 1_000, 1_900)
    other = access_claims(
        issuer=ISSUER, audience="a", subject="alice", roles=(), family="f" * 22, now=1, ttl=1
    )
    assert other["jti"] != claims["jti"]


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256"])
def test_a_signed_access_token_validates_with_the_proxy_validator(algorithm: str) -> None:
    keys = ring(algorithm)
    config = idp_config()
    family = new_family_id()
    token = keys.sign(
        access_claims(
            issuer=ISSUER,
            audience="data-api",
            subject="alice",
            roles=("analyst",),
            family=family,
            now=int(time.time()),
            ttl=900,
        )
    )
    issuers = TrustedIssuers([own_issuer_config(config, keys.algorithms)])
    principal = validate(token, issuers, StaticKeys({ISSUER: keys.verification_keys}))
    assert principal.id == "alice"
    assert principal.roles == ("analyst",)
    assert principal.issuer == ISSUER
    assert family_of_jti(principal.token_id) == family


def test_a_token_signed_by_a_key_not_in_the_ring_is_refused() -> None:
    keys = ring("EdDSA")
    impostor = ring("EdDSA")
    claims = access_claims(
        issuer=ISSUER,
        audience="data-api",
        subject="alice",
        roles=(),
        family=new_family_id(),
        now=int(time.time()),
        ttl=900,
    )
    issuers = TrustedIssuers([own_issuer_config(idp_config(), keys.algorithms)])
    with pytest.raises(AuthError, match="unknown_kid"):
        validate(impostor.sign(claims), issuers, StaticKeys({ISSUER: keys.verification_keys}))


@pytest.mark.parametrize(
    "issuer",
    [
        "http://sidecar.example.com",
        "https://sidecar.example.com/",
        "https://sidecar.example.com?x=1",
        "https://sidecar.example.com#x",
        "https://user:pw@sidecar.example.com",
        "sidecar.example.com",
        "ftp://sidecar.example.com",
    ],
)
def test_unusable_issuer_urls_are_refused_at_load(issuer: str) -> None:
    with pytest.raises(msgspec.ValidationError, match="issuer"):
        idp_config(issuer=issuer)


def test_http_issuer_is_accepted_on_loopback_and_urls_derive_from_it() -> None:
    config = idp_config(issuer="http://127.0.0.1:8080/idp")
    assert config.jwks_uri == "http://127.0.0.1:8080/idp/.well-known/jwks.json"
    assert config.discovery_url == "http://127.0.0.1:8080/idp/.well-known/openid-configuration"
    assert config.mount_path == "/idp"


def test_config_refuses_unknown_fields_and_out_of_range_lifetimes(tmp_path: Path) -> None:
    with pytest.raises(msgspec.ValidationError, match="access_token_tll"):
        idp_config(access_token_tll=60)
    with pytest.raises(msgspec.ValidationError, match="access_token_ttl"):
        idp_config(access_token_ttl=10)
    with pytest.raises(msgspec.ValidationError, match="per_user"):
        idp_config(rate_limit={"per_user": 0})


def test_after_a_key_rotation_old_tokens_still_validate_and_new_ones_use_the_new_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.pem"
    before = SigningKeyRing.load(path)
    claims = access_claims(
        issuer=ISSUER,
        audience="data-api",
        subject="alice",
        roles=(),
        family=new_family_id(),
        now=int(time.time()),
        ttl=900,
    )
    old_token = before.sign(claims)
    rotate_key_file(path, "ES256")
    after = SigningKeyRing.load(path)
    issuers = TrustedIssuers([own_issuer_config(idp_config(), after.algorithms)])
    keys = StaticKeys({ISSUER: after.verification_keys})
    assert validate(old_token, issuers, keys).id == "alice"
    new_token = after.sign(claims)
    assert jwt.get_unverified_header(new_token)["kid"] == after.active.kid != before.active.kid
    assert validate(new_token, issuers, keys).id == "alice"
