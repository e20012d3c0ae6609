"""Hostile and broken SAML responses, each posted to the real ACS: none yields a principal.

Every response here is made by the real pysaml2 IdP and then changed the way an attacker
(or a misconfigured IdP) would; "resigned" means the IdP signed the changed document
again, so only the SP's own rules stand between it and a login.
"""

from __future__ import annotations

import base64
import copy
import time
from collections.abc import AsyncIterator
from xml.etree import ElementTree as ET

import aiohttp
import pytest

from tests.integration.authn.saml.conftest import IDP_ENTITY, Keys, Site, SiteFactory
from tests.integration.authn.saml.idp import (
    DS,
    SAML,
    SAMLP,
    AuthnRequestSeen,
    IdentityProvider,
    assertion_of,
    edit,
    edit_and_resign,
)

Element = ET.Element


def instant(offset_seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + offset_seconds))


async def refused(site: Site, response: aiohttp.ClientResponse, status: int = 401) -> str:
    """Assert the ACS refused with `status` and handed nobody to on_login; return the reason."""
    body = await response.json()
    assert response.status == status, body
    assert site.logins == []
    return str(body["error"])


def conditions(root: Element) -> Element:
    found = assertion_of(root).find(f"{{{SAML}}}Conditions")
    assert found is not None
    return found


def confirmation_data(root: Element) -> Element:
    found = assertion_of(root).find(
        f"{{{SAML}}}Subject/{{{SAML}}}SubjectConfirmation/{{{SAML}}}SubjectConfirmationData"
    )
    assert found is not None
    return found


def name_id(element: Element) -> Element:
    found = element.find(f"{{{SAML}}}Subject/{{{SAML}}}NameID")
    assert found is not None
    return found


def unsigned_copy(assertion: Element, new_id: str, subject: str) -> Element:
    """The attacker's assertion: a copy with another subject and no signature."""
    evil = copy.deepcopy(assertion)
    evil.set("ID", new_id)
    for signature in evil.findall(f"{{{DS}}}Signature"):
        evil.remove(signature)
    name_id(evil).text = subject
    return evil


@pytest.fixture
async def seen(site: Site) -> AuthnRequestSeen:
    return await site.login()


# -- signatures ---------------------------------------------------------------------------


async def test_unsigned_response_and_assertion(site: Site, seen: AuthnRequestSeen) -> None:
    xml = site.idp.respond(seen, sign_assertion=False, sign_response=False)
    await refused(site, await site.post(xml))


async def test_unsigned_assertion_in_signed_response_needs_policy(
    make_site: SiteFactory,
) -> None:
    strict = await make_site()
    xml = strict.idp.respond(await strict.login(), sign_assertion=False, sign_response=True)
    await refused(strict, await strict.post(xml))

    lenient = await make_site(signature_policy="assertion_or_response")
    xml = lenient.idp.respond(await lenient.login(), sign_assertion=False, sign_response=True)
    assert (await lenient.post(xml)).status == 200


async def test_signature_removed(site: Site, seen: AuthnRequestSeen) -> None:
    def strip(root: Element) -> None:
        assertion = assertion_of(root)
        signature = assertion.find(f"{{{DS}}}Signature")
        assert signature is not None
        assertion.remove(signature)

    await refused(site, await site.post(edit(site.idp.respond(seen), strip)))


async def test_assertion_signed_by_another_key(
    site: Site, seen: AuthnRequestSeen, saml_keys: Keys
) -> None:
    xml = edit_and_resign(
        site.idp, site.idp.respond(seen), lambda _: None, key_file=saml_keys.other.key_file
    )
    await refused(site, await site.post(xml))


async def test_subject_changed_after_signing(site: Site, seen: AuthnRequestSeen) -> None:
    def become_admin(root: Element) -> None:
        name_id(assertion_of(root)).text = "admin@corp.example"

    await refused(site, await site.post(edit(site.idp.respond(seen), become_admin)))


async def test_sha1_signature_refused(site: Site, seen: AuthnRequestSeen) -> None:
    xml = site.idp.server.create_authn_response(
        {},
        in_response_to=seen.request_id,
        destination=seen.acs_url,
        sp_entity_id=seen.sp_entity_id,
        userid="alice@corp.example",
        authn={"class_ref": "urn:oasis:names:tc:SAML:2.0:ac:classes:Password"},
        sign_assertion=True,
    )
    assert "rsa-sha1" in str(xml)
    assert await refused(site, await site.post(str(xml))) == "saml_weak_signature"


# -- signature wrapping -------------------------------------------------------------------


async def test_xsw_unsigned_assertion_before_signed_one(site: Site, seen: AuthnRequestSeen) -> None:
    """XSW: the attacker's assertion first, the genuine signed one after it."""

    def wrap(root: Element) -> None:
        assertion = assertion_of(root)
        index = list(root).index(assertion)
        root.insert(index, unsigned_copy(assertion, "_evil", "admin@corp.example"))

    assert await refused(site, await site.post(edit(site.idp.respond(seen), wrap))) == (
        "saml_bad_structure"
    )


async def test_xsw_signed_assertion_moved_into_extensions_same_id(
    site: Site, seen: AuthnRequestSeen
) -> None:
    """XSW: the signed assertion hidden in samlp:Extensions; an unsigned twin with the SAME
    ID (and the genuine signature copied in) takes its place."""

    def wrap(root: Element) -> None:
        assertion = assertion_of(root)
        evil = copy.deepcopy(assertion)
        name_id(evil).text = "admin@corp.example"
        root.remove(assertion)
        extensions = ET.Element(f"{{{SAMLP}}}Extensions")
        extensions.append(assertion)
        root.insert(1, extensions)
        root.append(evil)

    await refused(site, await site.post(edit(site.idp.respond(seen), wrap)))


async def test_xsw_signed_assertion_inside_attackers_assertion(
    site: Site, seen: AuthnRequestSeen
) -> None:
    """XSW: the attacker's assertion carries the genuine one inside its own Advice."""

    def wrap(root: Element) -> None:
        assertion = assertion_of(root)
        evil = unsigned_copy(assertion, "_evil", "admin@corp.example")
        advice = ET.SubElement(evil, f"{{{SAML}}}Advice")
        advice.append(assertion)
        root.remove(assertion)
        root.append(evil)

    await refused(site, await site.post(edit(site.idp.respond(seen), wrap)))


async def test_xsw_signed_assertion_inside_signature_object(
    site: Site, seen: AuthnRequestSeen
) -> None:
    """XSW: the genuine assertion moved into a ds:Object of the attacker's copied signature."""

    def wrap(root: Element) -> None:
        assertion = assertion_of(root)
        signature = assertion.find(f"{{{DS}}}Signature")
        assert signature is not None
        evil = unsigned_copy(assertion, assertion.get("ID", ""), "admin@corp.example")
        stolen = copy.deepcopy(signature)
        holder = ET.SubElement(stolen, f"{{{DS}}}Object")
        holder.append(assertion)
        evil.insert(1, stolen)
        root.remove(assertion)
        root.append(evil)

    await refused(site, await site.post(edit(site.idp.respond(seen), wrap)))


async def test_xsw_signed_response_wrapped_in_attackers_response(
    site: Site, seen: AuthnRequestSeen
) -> None:
    """XSW on the response signature: the genuine signed response hidden in Extensions of
    an attacker's response whose assertion is unsigned."""
    genuine = site.idp.respond(seen, sign_assertion=False, sign_response=True)

    def wrap(root: Element) -> None:
        original = copy.deepcopy(root)
        root.set("ID", "_evil-response")
        signature = root.find(f"{{{DS}}}Signature")
        assert signature is not None
        root.remove(signature)
        name_id(assertion_of(root)).text = "admin@corp.example"
        extensions = ET.Element(f"{{{SAMLP}}}Extensions")
        extensions.append(original)
        root.insert(1, extensions)

    await refused(site, await site.post(edit(genuine, wrap)))


# -- subject ------------------------------------------------------------------------------


async def test_comment_in_name_id_does_not_truncate(site: Site, seen: AuthnRequestSeen) -> None:
    """The IdP signed `admin@corp.example.evil.test` (an attacker's own account); a comment
    keeps the signature valid (exclusive c14n drops comments). The SP must not read only
    the text before the comment."""
    xml = site.idp.respond(seen, name_id="admin@corp.example.evil.test")
    injected = xml.replace(
        ">admin@corp.example.evil.test<", ">admin@corp.example<!-- -->.evil.test<"
    )
    assert injected != xml

    response = await site.post(injected)

    assert response.status == 200, await response.text()
    assert (await response.json())["id"] == "admin@corp.example.evil.test"
    assert [p.id for p, _ in site.logins] == ["admin@corp.example.evil.test"]


# -- replay and InResponseTo --------------------------------------------------------------


async def test_replayed_response(site: Site, seen: AuthnRequestSeen) -> None:
    xml = site.idp.respond(seen)
    assert (await site.post(xml)).status == 200
    site.logins.clear()
    assert await refused(site, await site.post(xml)) in ("saml_unknown_request", "saml_replay")


async def test_second_response_to_one_request(site: Site, seen: AuthnRequestSeen) -> None:
    first, second = site.idp.respond(seen), site.idp.respond(seen, name_id="bob@corp.example")
    assert (await site.post(first)).status == 200
    site.logins.clear()
    await refused(site, await site.post(second))


async def test_in_response_to_unknown(site: Site, seen: AuthnRequestSeen) -> None:
    forged = AuthnRequestSeen("_never-issued", seen.acs_url, seen.sp_entity_id, signed=False)
    xml = site.idp.respond(forged)
    assert await refused(site, await site.post(xml)) == "saml_unknown_request"


async def test_unsolicited_response(site: Site, seen: AuthnRequestSeen) -> None:
    def unsolicited(root: Element) -> None:
        del root.attrib["InResponseTo"]
        del confirmation_data(root).attrib["InResponseTo"]

    xml = edit_and_resign(site.idp, site.idp.respond(seen), unsolicited)
    assert await refused(site, await site.post(xml)) == "saml_unsolicited"


async def test_confirmation_names_another_request(site: Site, seen: AuthnRequestSeen) -> None:
    """The response's InResponseTo is ours, the signed bearer confirmation's is not."""
    other = await site.login()

    def mismatch(root: Element) -> None:
        confirmation_data(root).set("InResponseTo", other.request_id)

    xml = edit_and_resign(site.idp, site.idp.respond(seen), mismatch)
    await refused(site, await site.post(xml))


# -- audience, recipient, destination, issuer ---------------------------------------------


async def test_wrong_audience(site: Site, seen: AuthnRequestSeen) -> None:
    def retarget(root: Element) -> None:
        audience = conditions(root).find(f"{{{SAML}}}AudienceRestriction/{{{SAML}}}Audience")
        assert audience is not None
        audience.text = "https://other-sp.test/metadata"

    xml = edit_and_resign(site.idp, site.idp.respond(seen), retarget)
    await refused(site, await site.post(xml))


async def test_no_audience_restriction(site: Site, seen: AuthnRequestSeen) -> None:
    def drop(root: Element) -> None:
        restriction = conditions(root).find(f"{{{SAML}}}AudienceRestriction")
        assert restriction is not None
        conditions(root).remove(restriction)

    xml = edit_and_resign(site.idp, site.idp.respond(seen), drop)
    assert await refused(site, await site.post(xml)) == "saml_wrong_audience"


async def test_wrong_recipient(site: Site, seen: AuthnRequestSeen) -> None:
    def retarget(root: Element) -> None:
        confirmation_data(root).set("Recipient", "https://other-sp.test/saml/acs")

    xml = edit_and_resign(site.idp, site.idp.respond(seen), retarget)
    await refused(site, await site.post(xml))


async def test_wrong_destination(site: Site, seen: AuthnRequestSeen) -> None:
    def retarget(root: Element) -> None:
        root.set("Destination", "https://other-sp.test/saml/acs")

    genuine = site.idp.respond(seen, sign_response=True)
    await refused(site, await site.post(edit_and_resign(site.idp, genuine, retarget)))


async def test_issuer_not_the_configured_idp(
    site: Site, seen: AuthnRequestSeen, saml_keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A real IdP the SP does not trust answers a genuine request of the SP."""
    rogue = IdentityProvider(
        tmp_path_factory.mktemp("rogue"), "https://rogue.test/idp", saml_keys.other
    )
    metadata = await site.client.get("/saml/metadata")
    rogue.trust_sp(await metadata.read())
    xml = rogue.respond(seen, sign_response=True)
    assert "https://rogue.test/idp" in xml
    await refused(site, await site.post(xml))


async def test_configured_issuer_with_embedded_foreign_certificate(
    site: Site, seen: AuthnRequestSeen, saml_keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The rogue claims the trusted IdP's entity id and ships its own cert in KeyInfo."""
    rogue = IdentityProvider(tmp_path_factory.mktemp("rogue"), IDP_ENTITY, saml_keys.other)
    metadata = await site.client.get("/saml/metadata")
    rogue.trust_sp(await metadata.read())
    await refused(site, await site.post(rogue.respond(seen, sign_response=True)))


# -- time ---------------------------------------------------------------------------------


async def test_expired(site: Site, seen: AuthnRequestSeen) -> None:
    def expire(root: Element) -> None:
        conditions(root).set("NotBefore", instant(-900))
        conditions(root).set("NotOnOrAfter", instant(-600))
        confirmation_data(root).set("NotOnOrAfter", instant(-600))

    xml = edit_and_resign(site.idp, site.idp.respond(seen), expire)
    await refused(site, await site.post(xml))


async def test_expired_confirmation_only(site: Site, seen: AuthnRequestSeen) -> None:
    def expire(root: Element) -> None:
        confirmation_data(root).set("NotOnOrAfter", instant(-600))

    xml = edit_and_resign(site.idp, site.idp.respond(seen), expire)
    await refused(site, await site.post(xml))


async def test_not_yet_valid(site: Site, seen: AuthnRequestSeen) -> None:
    def postdate(root: Element) -> None:
        conditions(root).set("NotBefore", instant(600))
        conditions(root).set("NotOnOrAfter", instant(900))
        confirmation_data(root).set("NotOnOrAfter", instant(900))

    xml = edit_and_resign(site.idp, site.idp.respond(seen), postdate)
    await refused(site, await site.post(xml))


async def test_just_expired_within_skew_accepted(site: Site, seen: AuthnRequestSeen) -> None:
    """Clock skew is tolerated up to the configured bound (60 s): 20 s late still passes."""

    def late(root: Element) -> None:
        conditions(root).set("NotBefore", instant(-300))
        conditions(root).set("NotOnOrAfter", instant(-20))
        confirmation_data(root).set("NotOnOrAfter", instant(-20))

    xml = edit_and_resign(site.idp, site.idp.respond(seen), late)
    assert (await site.post(xml)).status == 200


# -- malformed and hostile bodies ---------------------------------------------------------

BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
    '<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol">&lol3;</samlp:Response>'
)
XXE = (
    '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    '<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol">&xxe;</samlp:Response>'
)


async def test_billion_laughs(site: Site) -> None:
    assert await refused(site, await site.post(BILLION_LAUGHS), 400) == "saml_malformed"


async def test_xxe(site: Site) -> None:
    response = await site.post(XXE)
    assert "root:" not in await response.text()
    assert await refused(site, response, 400) == "saml_malformed"


async def test_dtd_in_genuine_signed_response(site: Site, seen: AuthnRequestSeen) -> None:
    """A DTD (external subset) in front of a valid signed response: refused before xmlsec1
    could read the file."""
    xml = site.idp.respond(seen)
    body = xml.replace('<?xml version="1.0"?>', "", 1).lstrip()
    hostile = '<!DOCTYPE samlp:Response SYSTEM "file:///etc/passwd">' + body
    assert await refused(site, await site.post(hostile), 400) == "saml_malformed"


async def test_not_base64(site: Site) -> None:
    response = await site.post_raw({"SAMLResponse": "not*base64!"})
    assert await refused(site, response, 400) == "saml_malformed"


async def test_not_xml(site: Site) -> None:
    assert await refused(site, await site.post(b"\x00\xffhello"), 400) == "saml_malformed"


async def test_genuine_response_declaring_an_unknown_encoding(
    site: Site, seen: AuthnRequestSeen
) -> None:
    xml = site.idp.respond(seen)
    assert xml.startswith('<?xml version="1.0"?>')
    hostile = xml.replace('<?xml version="1.0"?>', '<?xml version="1.0" encoding="foo-bar"?>', 1)
    assert await refused(site, await site.post(hostile), 400) == "saml_malformed"


async def test_not_a_response(site: Site) -> None:
    xml = f'<saml:Assertion xmlns:saml="{SAML}" ID="_a" Version="2.0"/>'
    assert await refused(site, await site.post(xml), 400) == "saml_malformed"


async def test_five_megabytes(site: Site) -> None:
    payload = base64.b64encode(b"<" + b"a" * (5 * 1024 * 1024)).decode("ascii")
    response = await site.post_raw({"SAMLResponse": payload})
    assert await refused(site, response, 413) == "saml_too_large"


async def test_five_megabytes_streamed_without_length(site: Site) -> None:
    """A chunked body has no Content-Length: the limit must hold while reading."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"SAMLResponse="
        for _ in range(80):
            yield b"A" * 65536

    response = await site.post_raw(
        chunks(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert await refused(site, response, 413) == "saml_too_large"


@pytest.mark.parametrize(
    ("data", "headers"),
    [
        ({"RelayState": "/x"}, {}),
        ("SAMLResponse=a&SAMLResponse=b", {"Content-Type": "application/x-www-form-urlencoded"}),
        ('{"SAMLResponse": "x"}', {"Content-Type": "application/json"}),
        (b"SAMLResponse=\xff\xfe", {"Content-Type": "application/x-www-form-urlencoded"}),
    ],
)
async def test_bad_form(site: Site, data: object, headers: dict[str, str]) -> None:
    response = await site.post_raw(data, headers=headers)
    assert await refused(site, response, 400) == "saml_malformed"


async def test_idp_reports_failure(site: Site, seen: AuthnRequestSeen) -> None:
    error = site.idp.server.create_error_response(
        seen.request_id, seen.acs_url, info=("urn:oasis:names:tc:SAML:2.0:status:Responder", "no")
    )
    assert await refused(site, await site.post(str(error))) == "saml_idp_refused"
