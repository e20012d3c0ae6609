"""The structural gate in front of pysaml2: size, base64, no DTDs, no wrapping shapes."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.authn.principal import AuthError
from proxy.authn.saml.message import (
    MAX_DEPTH,
    SHA1_SIGNATURE_METHOD,
    ResponseShape,
    decode_saml_response,
    inspect_response,
)

NS = (
    'xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" '
    'xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" '
    'xmlns:ds="http://www.w3.org/2000/09/xmldsig#"'
)
RSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
SHA256 = "http://www.w3.org/2001/04/xmlenc#sha256"
SUCCESS = "urn:oasis:names:tc:SAML:2.0:status:Success"


def signature(ref: str, method: str = RSA_SHA256, digest: str = SHA256, extra: str = "") -> str:
    return (
        f'<ds:Signature><ds:SignedInfo><ds:SignatureMethod Algorithm="{method}"/>'
        f'<ds:Reference URI="#{ref}"><ds:DigestMethod Algorithm="{digest}"/>'
        f"<ds:DigestValue>AA==</ds:DigestValue></ds:Reference></ds:SignedInfo>"
        f"<ds:SignatureValue>AA==</ds:SignatureValue>{extra}</ds:Signature>"
    )


def assertion(aid: str = "_a1", signed: bool = True, inner: str = "") -> str:
    sig = signature(aid) if signed else ""
    return (
        f'<saml:Assertion ID="{aid}" Version="2.0"><saml:Issuer>https://idp.test</saml:Issuer>'
        f"{sig}{inner}</saml:Assertion>"
    )


def response(
    body: str | None = None, *, rid: str = "_r1", status: str = SUCCESS, head: str = ""
) -> bytes:
    content = assertion() if body is None else body
    return (
        f'{head}<samlp:Response {NS} ID="{rid}" InResponseTo="_req" Version="2.0">'
        f"<saml:Issuer>https://idp.test</saml:Issuer>"
        f'<samlp:Status><samlp:StatusCode Value="{status}"/></samlp:Status>'
        f"{content}</samlp:Response>"
    ).encode()


def reason(xml: bytes) -> str:
    with pytest.raises(AuthError) as refused:
        inspect_response(xml)
    return refused.value.reason


def test_well_formed_response_shape() -> None:
    shape = inspect_response(response(signature("_r1") + assertion()))
    assert shape.in_response_to == "_req"
    assert shape.issuer == "https://idp.test"
    assert shape.assertion_id == "_a1"
    assert (shape.response_signed, shape.assertion_signed) == (True, True)


@pytest.mark.parametrize(
    ("xml", "expected"),
    [
        (response(head='<!DOCTYPE x [<!ENTITY e "e">]>'), "saml_malformed"),
        (response(head='<!DOCTYPE samlp:Response SYSTEM "file:///etc/passwd">'), "saml_malformed"),
        (b"<a>", "saml_malformed"),
        (b"\xff\xfe<", "saml_malformed"),
        (response(head='<?xml version="1.0" encoding="foo-bar"?>'), "saml_malformed"),
        (
            assertion().replace("<saml:Assertion", f"<saml:Assertion {NS}").encode(),
            "saml_malformed",
        ),
        (response(status="urn:oasis:names:tc:SAML:2.0:status:Requester"), "saml_idp_refused"),
        (response(""), "saml_bad_structure"),
        (response(assertion() + assertion("_a2", signed=False)), "saml_bad_structure"),
        (response(assertion("_r1")), "saml_bad_structure"),
        (
            response(
                assertion(signed=False, inner=f"<saml:Advice>{assertion('_a2')}</saml:Advice>")
            ),
            "saml_bad_structure",
        ),
        (
            response(f"<samlp:Extensions>{assertion()}</samlp:Extensions>"),
            "saml_bad_structure",
        ),
        (response(signature("_a1") + assertion(signed=False)), "saml_bad_signature"),
        (response(assertion() + signature("_r1") + signature("_r1")), "saml_bad_structure"),
        (
            response(assertion(inner="<saml:Subject>" + signature("_a1") + "</saml:Subject>")),
            "saml_bad_structure",
        ),
        (
            response(signature("_r1", method=SHA1_SIGNATURE_METHOD) + assertion()),
            "saml_weak_signature",
        ),
        (
            response(
                signature("_r1", digest="http://www.w3.org/2000/09/xmldsig#sha1") + assertion()
            ),
            "saml_weak_signature",
        ),
        (response(signature("_r1", extra="<ds:Object/>") + assertion()), "saml_bad_signature"),
        (
            response(
                "<saml:EncryptedAssertion>"
                '<xenc:EncryptedData xmlns:xenc="x"/>'
                "</saml:EncryptedAssertion>"
            ),
            "saml_unsupported",
        ),
        (
            response(assertion(inner="<a>" * MAX_DEPTH + "</a>" * MAX_DEPTH)),
            "saml_malformed",
        ),
    ],
    ids=[
        "entity-dtd",
        "external-dtd",
        "truncated",
        "binary",
        "unknown-encoding",
        "assertion-root",
        "idp-status",
        "no-assertion",
        "two-assertions",
        "duplicate-id",
        "assertion-in-advice",
        "assertion-in-extensions",
        "signature-points-elsewhere",
        "two-response-signatures",
        "signature-deep-inside",
        "sha1-signature",
        "sha1-digest",
        "ds-object",
        "encrypted",
        "too-deep",
    ],
)
def test_refused_shapes(xml: bytes, expected: str) -> None:
    assert reason(xml) == expected


def test_sha1_allowed_only_when_configured() -> None:
    xml = response(signature("_r1", method=SHA1_SIGNATURE_METHOD) + assertion())
    assert inspect_response(xml, allow_sha1=True).response_signed


def test_comment_inside_issuer_is_read_whole() -> None:
    xml = response().replace(
        b"https://idp.test</saml:Issuer><samlp:Status",
        b"https://idp<!---->.test</saml:Issuer><samlp:Status",
    )
    assert inspect_response(xml).issuer == "https://idp.test"


def test_decode_accepts_mime_line_breaks() -> None:
    encoded = base64.encodebytes(b"<x/>" * 40).decode("ascii")
    assert "\n" in encoded
    assert decode_saml_response(encoded, 4096) == b"<x/>" * 40


@pytest.mark.parametrize(
    ("encoded", "status"),
    [
        ("", 400),
        ("   ", 400),
        ("a", 400),
        ("@@@@", 400),
        ("QQ==QQ==", 400),
        ("001=", 400),  # padding bits set: "000=" is the one spelling of those bytes
        ("A" * 8000, 413),
    ],
)
def test_decode_refusals(encoded: str, status: int) -> None:
    with pytest.raises(AuthError) as refused:
        decode_saml_response(encoded, 4096)
    assert refused.value.status == status


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_decode_any_text_gives_bytes_or_clean_refusal(encoded: str) -> None:
    outcome: bytes | AuthError
    try:
        outcome = decode_saml_response(encoded, 4096)
    except AuthError as refused:
        outcome = refused
    if isinstance(outcome, AuthError):
        assert outcome.status in (400, 413)
    else:
        assert base64.b64encode(outcome).decode() == "".join(encoded.split())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_inspect_any_bytes_gives_shape_or_clean_refusal(xml: bytes) -> None:
    outcome: object
    try:
        outcome = inspect_response(xml)
    except AuthError as refused:
        outcome = refused.status
    assert outcome in (400, 401) or isinstance(outcome, ResponseShape)


# Encoding names as an XML declaration may give them: known, aliased, unknown, mangled.
ENCODINGS = st.sampled_from(
    ["utf-8", "UTF-16", "iso-8859-1", "cp500", "utf-7", "big5", "shift_jis", "rot13", "idna"]
) | st.text(alphabet="abcxyzABC0129-_.: ", max_size=16)


@settings(max_examples=300, deadline=None)
@given(ENCODINGS)
def test_any_declared_encoding_gives_shape_or_clean_refusal(encoding: str) -> None:
    xml = response(head=f'<?xml version="1.0" encoding="{encoding}"?>')
    outcome: object
    try:
        outcome = inspect_response(xml)
    except AuthError as refused:
        outcome = refused.status
    assert outcome in (400, 401) or isinstance(outcome, ResponseShape)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from([assertion(), assertion("_a2"), signature("_r1"), "<x/>", ""]), max_size=4
    )
)
def test_accepted_shapes_have_exactly_one_assertion(parts: list[str]) -> None:
    xml = response("".join(parts))
    try:
        shape = inspect_response(xml)
    except AuthError:
        return
    assert xml.count(b"<saml:Assertion ") == 1
    assert shape.assertion_id in ("_a1", "_a2")
