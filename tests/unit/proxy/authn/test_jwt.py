"""validate(): good tokens map to the right principal; every hostile token is refused cleanly."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt as pyjwt
import msgspec
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding

from proxy.authn.jwt import (
    IssuerConfig,
    IssuerKeys,
    KeyNotFound,
    KeyStore,
    StaticKeys,
    TrustedIssuers,
    VerificationKey,
    email_domain,
    validate,
)
from proxy.authn.principal import AuthError, Principal
from tests.unit.proxy.authn.tokens import (
    ATTACKER_KEY,
    AUDIENCE,
    EC_KEY,
    ISSUER,
    RSA_KEY,
    SECRET,
    b64,
    claims,
    issuer_config,
    json_text,
    key_store,
    raw_token,
    rs256_signed,
    rsa_public_pem,
    sign,
    trusted,
)


def accepted(
    token: str, issuers: TrustedIssuers | None = None, keys: KeyStore | None = None
) -> Principal:
    return validate(token, issuers or trusted(), keys or key_store())


def rejection(
    token: str, issuers: TrustedIssuers | None = None, keys: KeyStore | None = None
) -> AuthError:
    with pytest.raises(AuthError) as caught:
        validate(token, issuers or trusted(), keys or key_store())
    return caught.value


# --- tokens that must pass -------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
def test_each_default_algorithm_verifies_with_its_key(alg: str) -> None:
    principal = accepted(sign(alg=alg))
    assert principal.id == "alice"
    assert principal.issuer == ISSUER
    assert principal.auth_method == "jwt"


def test_claims_map_to_the_principal_through_configured_paths() -> None:
    config = issuer_config(
        roles_claim="realm_access.roles",
        groups_claim="https://corp.example/groups",
        principal_claim="preferred_username",
    )
    token = sign(
        claims(
            preferred_username="alice.smith",
            realm_access={"roles": ["analyst", "reader"]},
            **{"https://corp.example/groups": ["finance"]},
            email="alice@corp.com",
            email_verified=True,
            scope="read:sales write:tmp",
            jti="token-17",
        )
    )
    principal = accepted(token, trusted(config))
    assert principal.id == "alice.smith"
    assert principal.roles == ("analyst", "reader")
    assert principal.groups == ("finance",)
    assert principal.email == "alice@corp.com"
    assert principal.scopes == ("read:sales", "write:tmp")
    assert principal.token_id == "token-17"
    assert principal.expires_at == float(claims()["exp"])


def test_audience_list_is_accepted_when_one_entry_is_allowed() -> None:
    principal = accepted(sign(claims(aud=["other-api", AUDIENCE])))
    assert principal.id == "alice"


def test_small_clock_skew_within_leeway_is_tolerated() -> None:
    now = int(time.time())
    assert accepted(sign(claims(exp=now - 5, iat=now - 600))).id == "alice"
    assert accepted(sign(claims(nbf=now + 5, iat=now + 5))).id == "alice"


def test_absent_kid_is_accepted_when_the_issuer_has_exactly_one_key() -> None:
    single = StaticKeys(
        {ISSUER: IssuerKeys([VerificationKey.from_public_key(RSA_KEY.public_key(), "rsa-1")])}
    )
    assert accepted(sign(kid=None), keys=single).id == "alice"


def test_kidless_pem_key_serves_any_kid_when_it_is_the_only_key() -> None:
    single = StaticKeys(
        {ISSUER: IssuerKeys([VerificationKey.from_public_key(RSA_KEY.public_key())])}
    )
    assert accepted(sign(kid="whatever"), keys=single).id == "alice"


def test_shared_secret_issuer_accepts_hs256() -> None:
    config = issuer_config(jwks_url=None, shared_secret=SECRET)
    keys = StaticKeys({ISSUER: IssuerKeys([VerificationKey.from_shared_secret(SECRET.encode())])})
    token = pyjwt.encode(claims(), SECRET, algorithm="HS256")
    assert accepted(token, trusted(config), keys).id == "alice"


# --- signatures, algorithms and keys -------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", "NoNe", " none"])
@pytest.mark.parametrize("signature", [b"", b"anything"])
def test_alg_none_is_refused_in_every_casing(alg: str, signature: bytes) -> None:
    token = raw_token(json_text({"alg": alg, "kid": "rsa-1"}), json_text(claims()), signature)
    error = rejection(token)
    assert error.status == 401
    assert error.reason == ("unsigned_token" if signature else "missing_signature")


def test_hs256_signed_with_the_rsa_public_key_is_refused() -> None:
    header = b64(json_text({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}).encode())
    payload = b64(json_text(claims()).encode())
    mac = hmac.new(rsa_public_pem(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{b64(mac)}"
    assert rejection(token).reason == "algorithm_not_allowed"


def test_an_rsa_key_never_serves_as_hmac_secret_even_if_hs_is_allowed() -> None:
    # A shared-secret issuer whose key store wrongly holds the RSA key: the key's type
    # decides which algorithms it may verify, so HS256 still cannot use it.
    config = issuer_config(jwks_url=None, shared_secret=SECRET)
    wrong_store = StaticKeys(
        {ISSUER: IssuerKeys([VerificationKey.from_public_key(RSA_KEY.public_key(), "rsa-1")])}
    )
    header = b64(json_text({"alg": "HS256", "kid": "rsa-1"}).encode())
    payload = b64(json_text(claims()).encode())
    mac = hmac.new(rsa_public_pem(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    error = rejection(f"{header}.{payload}.{b64(mac)}", trusted(config), wrong_store)
    assert error.reason == "algorithm_key_mismatch"


def test_rs256_token_is_refused_by_a_shared_secret_issuer() -> None:
    config = issuer_config(jwks_url=None, shared_secret=SECRET)
    keys = StaticKeys({ISSUER: IssuerKeys([VerificationKey.from_shared_secret(SECRET.encode())])})
    assert rejection(sign(), trusted(config), keys).reason == "algorithm_not_allowed"


def test_algorithm_outside_the_issuer_allow_list_is_refused() -> None:
    config = issuer_config(algorithms=["ES256"])
    assert rejection(sign(alg="RS256"), trusted(config)).reason == "algorithm_not_allowed"


def test_algorithm_that_does_not_fit_the_selected_key_is_refused() -> None:
    # The EC key's kid on a token that claims RS256: the EC key cannot verify RS256.
    token = sign(alg="RS256", kid="ec-1")
    assert rejection(token).reason == "algorithm_key_mismatch"


def test_signature_by_another_key_is_refused() -> None:
    assert rejection(sign(key=ATTACKER_KEY)).reason == "bad_signature"


def test_unknown_kid_is_a_key_miss_that_may_trigger_a_refresh() -> None:
    error = rejection(sign(kid="rotated-in-later"))
    assert isinstance(error, KeyNotFound)
    assert error.status == 401
    assert error.issuer == ISSUER


def test_absent_kid_is_refused_when_the_issuer_has_several_keys() -> None:
    assert rejection(sign(kid=None)).reason == "kid_required"


@pytest.mark.parametrize(
    "kid",
    ["../../../etc/passwd", "' OR '1'='1' --", "rsa-1; DROP TABLE keys", "rsa-1\x00", "%2e%2e/"],
)
def test_kid_with_path_or_sql_characters_is_only_a_lookup_miss(kid: str) -> None:
    assert isinstance(rejection(sign(kid=kid)), KeyNotFound)


@pytest.mark.parametrize("kid", ["", "k" * 257, 17, ["rsa-1"]])
def test_kid_that_is_not_a_short_string_is_refused(kid: Any) -> None:
    header = json_text({"alg": "RS256", "kid": kid})
    assert rejection(rs256_signed(header, json_text(claims()))).reason == "malformed_kid"


def test_no_keys_loaded_for_the_issuer_cannot_be_decided() -> None:
    error = rejection(sign(), keys=StaticKeys({}))
    assert error.status == 503
    assert error.retriable


def test_key_urls_and_embedded_keys_in_the_header_are_ignored() -> None:
    attacker_jwk = pyjwt.algorithms.RSAAlgorithm.to_jwk(ATTACKER_KEY.public_key(), as_dict=True)
    hostile = {
        "jku": "https://evil.example/jwks.json",
        "x5u": "https://evil.example/cert.pem",
        "jwk": attacker_jwk,
        "x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOC"],
    }
    # Signed by the attacker under a kid the issuer does not have: a plain miss.
    assert isinstance(rejection(sign(key=ATTACKER_KEY, kid="evil", headers=hostile)), KeyNotFound)
    # Signed by the attacker under the issuer's kid: the issuer's key decides.
    forged = sign(key=ATTACKER_KEY, kid="rsa-1", headers=hostile)
    assert rejection(forged).reason == "bad_signature"
    # The issuer's own token carrying such headers still verifies: they are ignored.
    assert accepted(sign(headers=hostile)).id == "alice"


def test_unknown_critical_header_is_refused() -> None:
    header = json_text({"alg": "RS256", "kid": "rsa-1", "crit": ["exp-ext"], "exp-ext": 1})
    token = rs256_signed(header, json_text(claims()))
    assert rejection(token).reason == "unsupported_critical_header"


def test_detached_payload_header_is_refused() -> None:
    header = json_text({"alg": "RS256", "kid": "rsa-1", "b64": False, "crit": ["b64"]})
    assert rejection(rs256_signed(header, json_text(claims()))).status == 401


def _ecdsa_token(signature: bytes) -> str:
    header = json_text({"alg": "ES256", "kid": "ec-1"})
    return raw_token(header, json_text(claims()), signature)


P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.mark.parametrize(
    "signature",
    [
        bytes(64),  # r = s = 0
        P256_ORDER.to_bytes(32, "big") * 2,  # r = s = n, which is 0 mod n
        bytes(31) + b"\x01" + bytes(32),  # s = 0
    ],
)
def test_ecdsa_signature_with_zero_components_is_refused(signature: bytes) -> None:
    assert rejection(_ecdsa_token(signature)).reason == "bad_signature"


def test_the_ecdsa_library_itself_refuses_r_s_zero() -> None:
    es256 = pyjwt.algorithms.ECAlgorithm(pyjwt.algorithms.ECAlgorithm.SHA256)
    assert not es256.verify(b"message", EC_KEY.public_key(), bytes(64))


def test_ecdsa_signature_of_the_wrong_length_is_refused() -> None:
    good = sign(alg="ES256")
    signature = pyjwt.utils.base64url_decode(good.split(".")[2])
    truncated = good.rsplit(".", 1)[0] + "." + b64(signature[:-1])
    assert rejection(truncated).reason == "bad_signature"


def test_ecdsa_key_on_another_curve_is_not_accepted_for_es256() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="does not fit"):
        VerificationKey.from_public_key(p384.public_key(), kid="p384", alg="ES256")


# --- structure and encoding -------------------------------------------------------------


def test_stripped_signature_is_refused() -> None:
    header_and_payload = sign().rsplit(".", 1)[0]
    assert rejection(header_and_payload + ".").reason == "missing_signature"
    assert rejection(header_and_payload).reason == "malformed_token"


@pytest.mark.parametrize("cut", [1, 2, 10, 100])
def test_truncated_signature_is_refused(cut: int) -> None:
    token = sign()
    assert rejection(token[:-cut]).status == 401


def test_one_megabyte_token_is_refused_by_size_before_decoding() -> None:
    token = "A" * (1024 * 1024)
    assert rejection(token).reason == "token_too_large"
    large_claims = sign(claims(padding="p" * 20_000))
    assert rejection(large_claims).reason == "token_too_large"


def test_token_size_limit_is_configurable() -> None:
    token = sign(claims(padding="p" * 20_000))
    assert accepted(token, trusted(max_token_bytes=64 * 1024)).id == "alice"
    assert rejection(sign(), trusted(max_token_bytes=256)).reason == "token_too_large"


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        ('{"alg":"RS256","alg":"none","kid":"rsa-1"}', None),
        ('{"alg":"RS256","kid":"rsa-1","kid":"ec-1"}', None),
        (None, '{"sub":"alice","sub":"admin"}'),
        (None, '{"aud":"data-api","realm_access":{"roles":["r"],"roles":["admin"]}}'),
    ],
)
def test_duplicate_json_members_are_refused_even_when_signed(
    header: str | None, payload: str | None
) -> None:
    good_claims = claims()
    header_text = header or json_text({"alg": "RS256", "kid": "rsa-1"})
    if payload is None:
        payload_text = json_text(good_claims)
    else:
        # Keep every required claim valid so that only the duplicate can cause a refusal.
        extra = json_text({k: v for k, v in good_claims.items() if k not in ("sub", "aud")})
        payload_text = payload[:-1] + "," + extra[1:]
    token = rs256_signed(header_text, payload_text)
    assert rejection(token).reason == "duplicate_json_key"


@pytest.mark.parametrize(
    "token",
    [
        "!!!!.eyJzdWIiOiJhIn0.c2ln",
        "eyJhbGciOiJSUzI1NiJ9.%%%%.c2ln",
        raw_token("not json", json_text(claims()), b"sig"),
        raw_token("[1,2,3]", json_text(claims()), b"sig"),
        raw_token(json_text({"alg": "RS256"}), "null", b"sig"),
        raw_token(json_text({"alg": "RS256"}), '{"exp": NaN}', b"sig"),
        raw_token(json_text({"alg": "RS256"}), b"\xff\xfe{}", b"sig"),
        raw_token(json_text({"alg": "RS256"}), "[" * 5000 + "]" * 5000, b"sig"),
        raw_token('{"alg":["RS256"]}', json_text(claims()), b"sig"),
        "a.b.c.d.e",
        "a.b",
        "",
        "....",
        "é.é.é",
    ],
)
def test_malformed_tokens_are_refused_without_crashing(token: str) -> None:
    assert rejection(token).status == 401


def test_non_canonical_base64_is_refused_even_when_signed() -> None:
    # A segment of length 4k+2 leaves 4 unused bits in its last character; setting one
    # gives a second spelling of the same header, which must not be accepted.
    header = b64(json_text({"alg": "RS256", "kid": "rsa-1", "pad": "xy"}).encode())
    assert len(header) % 4 == 2
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = header[:-1] + alphabet[alphabet.index(header[-1]) ^ 1]
    assert twin != header
    assert base64.urlsafe_b64decode(twin + "==") == base64.urlsafe_b64decode(header + "==")
    signing_input = f"{twin}.{b64(json_text(claims()).encode())}"
    signature = RSA_KEY.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    assert rejection(f"{signing_input}.{b64(signature)}").reason == "malformed_token"


def test_encrypted_tokens_are_named_as_unsupported() -> None:
    assert rejection("a.b.c.d.e").reason == "encrypted_token_unsupported"


# --- claims ----------------------------------------------------------------------------


def test_expired_token_is_refused() -> None:
    now = int(time.time())
    assert rejection(sign(claims(exp=now - 3600, iat=now - 7200))).reason == "token_expired"


def test_not_yet_valid_token_is_refused() -> None:
    now = int(time.time())
    assert rejection(sign(claims(nbf=now + 3600))).reason == "token_not_yet_valid"


def test_token_issued_in_the_future_beyond_leeway_is_refused() -> None:
    now = int(time.time())
    token = sign(claims(iat=now + 3600, exp=now + 7200))
    assert rejection(token).reason == "issued_in_future"


def test_wrong_audience_is_refused() -> None:
    assert rejection(sign(claims(aud="another-api"))).reason == "wrong_audience"
    assert rejection(sign(claims(aud=["a", "b"]))).reason == "wrong_audience"


def test_untrusted_issuer_is_refused() -> None:
    token = sign(claims(iss="https://evil.example.com"))
    assert rejection(token).reason == "untrusted_issuer"


@pytest.mark.parametrize("claim", ["exp", "iss", "aud", "iat"])
def test_missing_mandatory_claim_is_refused(claim: str) -> None:
    error = rejection(sign(claims(**{claim: None})))
    assert error.reason in {"missing_claim", "untrusted_issuer"}


def test_configured_required_claim_is_enforced() -> None:
    config = issuer_config(required_claims=["jti"])
    assert rejection(sign(), trusted(config)).detail == "jti"
    assert accepted(sign(claims(jti="t1")), trusted(config)).token_id == "t1"


@pytest.mark.parametrize(
    "overrides",
    [
        {"exp": "tomorrow"},
        {"exp": True},
        {"exp": 10**400},
        {"exp": 1e300},
        {"iat": -(10**400)},
        {"nbf": 10**400},
        {"iat": [1]},
        {"nbf": {"t": 1}},
        {"aud": 17},
        {"aud": ["data-api", 3]},
        {"sub": 42},
        {"sub": ""},
    ],
)
def test_claims_of_the_wrong_type_are_refused(overrides: dict[str, Any]) -> None:
    assert rejection(sign(claims(**overrides))).status == 401


def test_roles_claim_of_the_wrong_shape_is_refused() -> None:
    config = issuer_config(roles_claim="realm_access.roles")
    token = sign(claims(realm_access={"roles": ["reader", {"admin": True}]}))
    assert rejection(token, trusted(config)).reason == "malformed_claim"


# --- email domain rule -----------------------------------------------------------------


def _corp_only(**overrides: Any) -> TrustedIssuers:
    return trusted(issuer_config(allowed_email_domains=["corp.com"], **overrides))


@pytest.mark.parametrize(
    "email",
    [
        "a@evil.com@corp.com",
        "a@corp.com.evil.com",
        "a@sub.corp.com",
        "a@evilcorp.com",
        '"a@corp.com"@evil.com',
        "a@corp.com.",
        "a@ corp.com",
        "@corp.com",
        "a@corp.com\n",
        "a@corp.com\x00",
    ],
)
def test_email_outside_the_allowed_domains_is_refused(email: str) -> None:
    token = sign(claims(email=email, email_verified=True))
    assert rejection(token, _corp_only()).reason == "email_domain_not_allowed"


def test_email_in_an_allowed_domain_passes_case_insensitively() -> None:
    token = sign(claims(email="Alice@Corp.COM", email_verified=True))
    assert accepted(token, _corp_only()).email == "Alice@Corp.COM"


def test_unverified_email_is_refused_by_the_domain_rule() -> None:
    token = sign(claims(email="alice@corp.com", email_verified=False))
    assert rejection(token, _corp_only()).reason == "email_not_verified"
    assert accepted(token, _corp_only(require_email_verified=False)).email == "alice@corp.com"


@pytest.mark.parametrize("verified", [None, False, "true", 1])
def test_an_email_the_issuer_does_not_vouch_for_is_not_passed_on(verified: object) -> None:
    # Identity headers promise a verified email: anything but `email_verified: true` leaves
    # the principal without one (the token is still accepted), unless the operator says
    # the issuer never sends the claim.
    extra = {} if verified is None else {"email_verified": verified}
    token = sign(claims(email="alice@corp.com", **extra))
    assert accepted(token, trusted(issuer_config())).email is None
    lenient = trusted(issuer_config(require_email_verified=False))
    assert accepted(token, lenient).email == "alice@corp.com"
    vouched = sign(claims(email="alice@corp.com", email_verified=True))
    assert accepted(vouched, trusted(issuer_config())).email == "alice@corp.com"


def test_missing_email_is_refused_by_the_domain_rule() -> None:
    assert rejection(sign(), _corp_only()).reason == "email_domain_not_allowed"


@pytest.mark.parametrize(
    ("address", "domain"),
    [
        ("a@corp.com", "corp.com"),
        ("first.last+tag@Mail.Corp.com", "mail.corp.com"),
        ("a@evil.com@corp.com", None),
        ("a..b@corp.com", None),
        (".a@corp.com", None),
        ("a@-corp.com", None),
        ("a@corp", None),
        ("a" * 65 + "@corp.com", None),
    ],
)
def test_email_domain_parses_strictly(address: str, domain: str | None) -> None:
    assert email_domain(address) == domain


# --- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"algorithms": ["none"]},
        {"algorithms": ["HS256"]},
        {"algorithms": ["RS256", "HS256"]},
        {"algorithms": []},
        {"jwks_url": None, "shared_secret": SECRET, "algorithms": ["RS256"]},
        {"jwks_url": None, "shared_secret": "short"},
        {"jwks_url": None, "shared_secret": SECRET, "algorithms": ["HS256", "HS512"]},
        {"discovery_url": "https://idp.example.com/.well-known/openid-configuration"},
        {"jwks_url": None},
        {"jwks_url": "http://idp.example.com/jwks"},
        {"jwks_url": "file:///etc/passwd"},
        {"audiences": []},
        {"leeway": 301},
        {"leeway": -1},
        {"jwks_min_refresh_interval": 0},
        # The background refresh would run only at the (longer) rate limit.
        {"jwks_min_refresh_interval": 600, "jwks_refresh_interval": 300},
        {"jwks_max_keys": 0},
        {"allowed_email_domains": ["Corp.com"]},
        {"unknown_field": 1},
    ],
)
def test_unsafe_or_incomplete_issuer_configuration_is_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        issuer_config(**overrides)


def test_plain_http_key_url_needs_the_explicit_flag() -> None:
    config = issuer_config(jwks_url="http://127.0.0.1:8080/jwks", allow_insecure_http=True)
    assert config.jwks_url == "http://127.0.0.1:8080/jwks"


def test_shared_secret_never_appears_in_the_configuration_repr() -> None:
    config = issuer_config(jwks_url=None, shared_secret=SECRET)
    assert SECRET not in repr(config)


def test_the_same_issuer_cannot_be_configured_twice() -> None:
    with pytest.raises(ValueError, match="configured twice"):
        TrustedIssuers([issuer_config(), issuer_config(audiences=["x"])])


def test_defaults_are_asymmetric_and_require_the_registered_claims() -> None:
    config = msgspec.convert(
        {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_url": "https://i/j"}, IssuerConfig
    )
    assert set(config.effective_algorithms) == {"RS256", "ES256", "EdDSA", "PS256"}
    assert config.leeway == 30
    assert json.loads(msgspec.json.encode(config))["principal_claim"] == "sub"


@pytest.mark.parametrize(
    "claim",
    [
        {"sub": "al\udcffice"},
        {"roles": ["analyst", "\ud800"]},
        {"groups": ["fin\udc80"]},
        {"scope": "read \udfff"},
        {"jti": "t-\udc00"},
    ],
)
def test_a_claim_that_is_not_valid_unicode_is_refused(claim: dict[str, Any]) -> None:
    # JSON can spell a lone surrogate ("\\udcff"): such an identity could not be audited,
    # captured or passed upstream as it is.
    config = issuer_config(roles_claim="roles", groups_claim="groups")
    assert rejection(sign(claims(**claim)), trusted(config)).reason == "malformed_claim"


def test_characters_outside_the_basic_plane_are_fine() -> None:
    # A surrogate pair in JSON ("\\ud83d\\ude00") is one valid character.
    principal = accepted(sign(claims(sub="alice\U0001f600", roles=["\U0001f4ca"])))
    assert principal.id == "alice\U0001f600"
