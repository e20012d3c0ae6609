"""Properties of validate(): no altered token passes, and no issuer's token passes as another's."""

from __future__ import annotations

import json
import time

import jwt as pyjwt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.authn.jwt import (
    IssuerKeys,
    StaticKeys,
    TrustedIssuers,
    VerificationKey,
    email_domain,
    validate,
)
from proxy.authn.principal import AuthError
from tests.unit.proxy.authn.tokens import (
    ED_KEY,
    b64,
    claims,
    eddsa_signed,
    issuer_config,
    key_store,
    sign,
    trusted,
)

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
ISSUERS = trusted()
KEYS = key_store()
# Long-lived, so that no example can expire while the suite runs.
VALID_TOKENS = {
    alg: sign(claims(exp=int(time.time()) + 86400), alg=alg)
    for alg in ("RS256", "PS256", "ES256", "EdDSA")
}


def _refused(token: str) -> bool:
    try:
        validate(token, ISSUERS, KEYS)
    except AuthError:
        return True
    return False


def test_the_unmutated_tokens_are_valid() -> None:
    # Without this, every mutation property below would pass vacuously.
    for token in VALID_TOKENS.values():
        assert not _refused(token)


algs = st.sampled_from(sorted(VALID_TOKENS))


@PROPERTY_SETTINGS
@given(alg=algs, data=st.data())
def test_any_bit_flip_is_refused(alg: str, data: st.DataObject) -> None:
    token = VALID_TOKENS[alg].encode()
    position = data.draw(st.integers(0, len(token) - 1))
    bit = data.draw(st.integers(0, 7))
    mutated = bytearray(token)
    mutated[position] ^= 1 << bit
    text = mutated.decode("latin-1")
    assert _refused(text)


@PROPERTY_SETTINGS
@given(alg=algs, data=st.data())
def test_any_truncation_or_extension_is_refused(alg: str, data: st.DataObject) -> None:
    token = VALID_TOKENS[alg]
    cut = data.draw(st.integers(0, len(token) - 1))
    suffix = data.draw(st.text(alphabet="ABCabc012-_.=", max_size=8))
    mutated = token[:cut] + suffix
    assume(mutated != token)
    assert _refused(mutated)


@PROPERTY_SETTINGS
@given(alg=algs, order=st.permutations([0, 1, 2]), other=algs)
def test_any_segment_swap_or_splice_is_refused(alg: str, order: list[int], other: str) -> None:
    segments = VALID_TOKENS[alg].split(".")
    foreign = VALID_TOKENS[other].split(".")
    swapped = ".".join(segments[i] for i in order)
    spliced = ".".join([foreign[0], segments[1], segments[2]])
    if swapped != VALID_TOKENS[alg]:
        assert _refused(swapped)
    if spliced != VALID_TOKENS[alg]:
        assert _refused(spliced)


header_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=20), st.lists(st.text(max_size=5))
)


@PROPERTY_SETTINGS
@given(alg=algs, name=st.text(min_size=1, max_size=10), value=header_values)
def test_any_header_change_is_refused(alg: str, name: str, value: object) -> None:
    token = VALID_TOKENS[alg]
    header_segment, payload_segment, signature_segment = token.split(".")
    header = json.loads(pyjwt.utils.base64url_decode(header_segment))
    header[name] = value
    new_header = b64(json.dumps(header).encode())
    assume(new_header != header_segment)
    assert _refused(f"{new_header}.{payload_segment}.{signature_segment}")


@PROPERTY_SETTINGS
@given(
    alg=algs, name=st.sampled_from(["sub", "aud", "exp", "iss", "roles", "x"]), value=header_values
)
def test_any_payload_change_is_refused(alg: str, name: str, value: object) -> None:
    header_segment, payload_segment, signature_segment = VALID_TOKENS[alg].split(".")
    payload = json.loads(pyjwt.utils.base64url_decode(payload_segment))
    payload[name] = value
    new_payload = b64(json.dumps(payload).encode())
    assume(new_payload != payload_segment)
    assert _refused(f"{header_segment}.{new_payload}.{signature_segment}")


@PROPERTY_SETTINGS
@given(st.text(max_size=300))
def test_arbitrary_text_is_refused_cleanly(token: str) -> None:
    assert _refused(token)


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz:/.-", min_size=1, max_size=30)


@settings(max_examples=80, deadline=None)
@given(issuer_a=names, issuer_b=names, audience_a=names, audience_b=names, both=st.booleans())
def test_a_token_for_issuer_a_never_passes_as_issuer_b(
    issuer_a: str, issuer_b: str, audience_a: str, audience_b: str, both: bool
) -> None:
    assume((issuer_a, audience_a) != (issuer_b, audience_b))
    # The worst case: both issuers publish the very same key under the same kid.
    shared_key = IssuerKeys([VerificationKey.from_public_key(ED_KEY.public_key(), "shared")])
    config_a = issuer_config(issuer=issuer_a, audiences=[audience_a])
    config_b = issuer_config(issuer=issuer_b, audiences=[audience_b])
    token = sign(claims(iss=issuer_a, aud=audience_a), alg="EdDSA", kid="shared")
    keys = StaticKeys({issuer_a: shared_key, issuer_b: shared_key})

    assert validate(token, TrustedIssuers([config_a]), keys).issuer == issuer_a
    if issuer_a == issuer_b:
        return  # same issuer, different audience: checked below only when distinct
    configs = [config_b, config_a] if both else [config_b]
    try:
        principal = validate(token, TrustedIssuers(configs), keys)
    except AuthError:
        return
    assert both
    assert principal.issuer == issuer_a


@settings(max_examples=80, deadline=None)
@given(audience_a=names, audience_b=names)
def test_a_token_for_audience_a_never_passes_for_audience_b(
    audience_a: str, audience_b: str
) -> None:
    assume(audience_a != audience_b)
    token = sign(claims(aud=audience_a), alg="EdDSA")
    with pytest.raises(AuthError):
        validate(token, trusted(issuer_config(audiences=[audience_b])), KEYS)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_email_domain_only_accepts_a_single_at_and_its_own_domain(address: str) -> None:
    domain = email_domain(address)
    if domain is not None:
        assert address.count("@") == 1
        assert address.lower().endswith("@" + domain)
        assert domain.isascii()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
CLAIM_NAMES = ["sub", "aud", "exp", "iat", "nbf", "iss", "email", "scope", "realm_access", "jti"]
MAPPING_ISSUERS = trusted(
    issuer_config(roles_claim="realm_access.roles", allowed_email_domains=["corp.com"])
)


@PROPERTY_SETTINGS
@given(overrides=st.dictionaries(st.sampled_from(CLAIM_NAMES), json_values, max_size=4))
def test_correctly_signed_hostile_claims_never_crash(overrides: dict[str, object]) -> None:
    # Signed by the real key, so everything after the signature check is exercised too.
    token = eddsa_signed(claims(**overrides))
    try:
        principal = validate(token, MAPPING_ISSUERS, KEYS)
    except AuthError:
        return
    assert isinstance(principal.id, str)
    assert principal.email is None or principal.email.lower().endswith("@corp.com")
