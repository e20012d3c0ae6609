"""The ACS input, checked for shape before pysaml2 or xmlsec1 ever see it.

pysaml2 verifies signatures by handing the document to xmlsec1 (libxml2), which resolves
DTDs and entities on its own, and it finds "the" assertion by walking its own parse tree.
A signature-wrapping attack lives in the gap between what xmlsec1 verified and what the
code reads. This module closes that gap structurally, with a pure function of the bytes:

- the body is strict base64 of at most `max_bytes` of XML, checked before decoding;
- the XML has no DTD, no entity declarations and no external references (defusedxml with
  `forbid_dtd`): nothing is expanded or fetched, ever;
- the root is a `samlp:Response` with a Success status, holding exactly one
  `saml:Assertion` anywhere in the document, as its direct child, and no
  `EncryptedAssertion` (not supported);
- every `ID` in the document is unique, so xmlsec1's `--node-id` lookup and pysaml2's tree
  walk cannot pick different elements;
- every `ds:Signature` is an enveloped signature that is a direct child of the response or
  the assertion, with one `Reference` to its parent's `ID`, and SHA-2 algorithms only.
Every refusal is an `AuthError` with status 400 (malformed) or 401 (not acceptable).
"""

from __future__ import annotations

import base64
import binascii
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree
import msgspec

from proxy.authn.principal import AuthError

SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
DS = "http://www.w3.org/2000/09/xmldsig#"
RESPONSE_TAG = f"{{{SAMLP}}}Response"
ASSERTION_TAG = f"{{{SAML}}}Assertion"
ENCRYPTED_ASSERTION_TAG = f"{{{SAML}}}EncryptedAssertion"
ISSUER_TAG = f"{{{SAML}}}Issuer"
SIGNATURE_TAG = f"{{{DS}}}Signature"
STATUS_CODE_PATH = f"{{{SAMLP}}}Status/{{{SAMLP}}}StatusCode"
STATUS_SUCCESS = "urn:oasis:names:tc:SAML:2.0:status:Success"

SHA2_SIGNATURE_METHODS = frozenset(
    {
        "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256",
        "http://www.w3.org/2001/04/xmldsig-more#rsa-sha384",
        "http://www.w3.org/2001/04/xmldsig-more#rsa-sha512",
        "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256",
        "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha384",
        "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha512",
    }
)
SHA2_DIGEST_METHODS = frozenset(
    {
        "http://www.w3.org/2001/04/xmlenc#sha256",
        "http://www.w3.org/2001/04/xmldsig-more#sha384",
        "http://www.w3.org/2001/04/xmlenc#sha512",
    }
)
SHA1_SIGNATURE_METHOD = "http://www.w3.org/2000/09/xmldsig#rsa-sha1"
SHA1_DIGEST_METHOD = "http://www.w3.org/2000/09/xmldsig#sha1"
# SAML responses are a few levels deep; pysaml2 builds its objects recursively.
MAX_DEPTH = 32
MAX_ID_CHARS = 256


class ResponseShape(msgspec.Struct, frozen=True, kw_only=True):
    """What the structural check learned about a response (nothing here is verified yet)."""

    xml: bytes
    response_id: str
    in_response_to: str | None
    issuer: str | None
    assertion_id: str
    response_signed: bool
    assertion_signed: bool


def malformed(detail: str) -> AuthError:
    return AuthError("saml_malformed", 400, detail=detail)


def decode_saml_response(encoded: str, max_bytes: int) -> bytes:
    """Strict base64 of the `SAMLResponse` form field, bounded before decoding."""
    # Line breaks are legal in the POST binding (MIME-style base64); nothing else is.
    compact = "".join(encoded.split())
    if len(compact) > (max_bytes * 4) // 3 + 4:
        raise AuthError("saml_too_large", 413, detail=f"SAMLResponse over {max_bytes} bytes")
    if not compact:
        raise malformed("empty SAMLResponse")
    try:
        decoded = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise malformed(f"SAMLResponse is not base64: {exc}") from None
    # `validate` still lets the unused bits before `=` be anything ("001=" reads as
    # "000="): one message, one spelling, as strict base64 (RFC 4648 3.5) has it.
    if base64.b64encode(decoded) != compact.encode("ascii"):
        raise malformed("SAMLResponse is not canonical base64 (padding bits set)")
    return decoded


def _depth_ok(root: Element) -> bool:
    stack = [(root, 1)]
    while stack:
        element, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        stack.extend((child, depth + 1) for child in element)
    return True


def _check_signature(signature: Element, parent: Element, allow_sha1: bool) -> None:
    """One enveloped signature: one Reference to its parent's ID, allowed algorithms."""
    parent_id = parent.get("ID")
    references = signature.findall(f"{{{DS}}}SignedInfo/{{{DS}}}Reference")
    if len(references) != 1 or references[0].get("URI") != f"#{parent_id}":
        raise AuthError("saml_bad_signature", detail="signature must reference its parent's ID")
    if signature.find(f"{{{DS}}}Object") is not None:
        raise AuthError("saml_bad_signature", detail="ds:Object is not allowed in a signature")
    method = signature.find(f"{{{DS}}}SignedInfo/{{{DS}}}SignatureMethod")
    digest = references[0].find(f"{{{DS}}}DigestMethod")
    signature_methods = SHA2_SIGNATURE_METHODS | ({SHA1_SIGNATURE_METHOD} if allow_sha1 else set())
    digest_methods = SHA2_DIGEST_METHODS | ({SHA1_DIGEST_METHOD} if allow_sha1 else set())
    if method is None or method.get("Algorithm") not in signature_methods:
        raise AuthError("saml_weak_signature", detail="signature algorithm not allowed")
    if digest is None or digest.get("Algorithm") not in digest_methods:
        raise AuthError("saml_weak_signature", detail="digest algorithm not allowed")


def _issuer(element: Element) -> str | None:
    issuer = element.find(ISSUER_TAG)
    if issuer is None:
        return None
    return "".join(issuer.itertext()).strip()


def inspect_response(xml: bytes, *, allow_sha1: bool = False) -> ResponseShape:
    """Parse without expanding anything and refuse shapes that allow signature wrapping."""
    try:
        root = defusedxml.ElementTree.fromstring(
            xml, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except defusedxml.DefusedXmlException as exc:
        raise malformed(f"DTDs and entities are not allowed: {type(exc).__name__}") from None
    except (ParseError, ValueError, LookupError) as exc:
        # LookupError: an XML declaration naming an encoding Python does not know.
        raise malformed(f"not well-formed XML: {exc}") from None
    if root.tag != RESPONSE_TAG:
        raise malformed("document is not a samlp:Response")
    if not _depth_ok(root):
        raise malformed(f"document nested deeper than {MAX_DEPTH} levels")

    status = root.find(STATUS_CODE_PATH)
    if status is None or status.get("Value") != STATUS_SUCCESS:
        # Unsigned and unverified, but it can only make us refuse: report what the IdP said.
        code = status.get("Value", "") if status is not None else "no StatusCode"
        raise AuthError("saml_idp_refused", detail=f"IdP status {code[:200]}")

    ids: set[str] = set()
    assertions: list[Element] = []
    signatures: list[Element] = []
    for element in root.iter():
        if element.tag == ENCRYPTED_ASSERTION_TAG:
            raise AuthError("saml_unsupported", detail="encrypted assertions are not supported")
        if element.tag == ASSERTION_TAG:
            assertions.append(element)
        elif element.tag == SIGNATURE_TAG:
            signatures.append(element)
        for name in ("ID", "AssertionID"):
            value = element.get(name)
            if value is None:
                continue
            if value in ids or not value or len(value) > MAX_ID_CHARS:
                raise AuthError("saml_bad_structure", detail=f"duplicate or bad ID {value[:64]!r}")
            ids.add(value)

    if len(assertions) != 1:
        raise AuthError("saml_bad_structure", detail=f"{len(assertions)} assertions, expected 1")
    assertion = assertions[0]
    if not any(child is assertion for child in root):
        raise AuthError("saml_bad_structure", detail="the assertion is not a child of Response")
    response_id, assertion_id = root.get("ID"), assertion.get("ID")
    if not response_id or not assertion_id:
        raise malformed("Response and Assertion must carry an ID")

    signed_parents: list[Element] = []
    for signature in signatures:
        parent = next((p for p in (root, assertion) if any(c is signature for c in p)), None)
        if parent is None or any(p is parent for p in signed_parents):
            raise AuthError("saml_bad_structure", detail="signature in an unexpected place")
        _check_signature(signature, parent, allow_sha1)
        signed_parents.append(parent)

    in_response_to = root.get("InResponseTo")
    if in_response_to is not None and len(in_response_to) > MAX_ID_CHARS:
        raise malformed("InResponseTo is too long")
    return ResponseShape(
        xml=xml,
        response_id=response_id,
        in_response_to=in_response_to,
        issuer=_issuer(root),
        assertion_id=assertion_id,
        response_signed=any(p is root for p in signed_parents),
        assertion_signed=any(p is assertion for p in signed_parents),
    )
