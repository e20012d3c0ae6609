"""`decide()`: every acceptance rule on verified facts, one variation at a time."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.authn.principal import AuthError
from proxy.authn.saml.config import NAMEID_EMAIL, NAMEID_TRANSIENT, RoleMapping, SamlSpConfig
from proxy.authn.saml.decision import (
    BEARER,
    Attribute,
    Confirmation,
    VerifiedFacts,
    decide,
    map_roles,
)

ACS = "https://sp.test/saml/acs"
SP = "https://sp.test/saml/metadata"
IDP = "https://idp.test/idp"
NOW = 1_800_000_000.0


def instant(offset: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW + offset))


CONFIG = SamlSpConfig(
    entity_id=SP,
    acs_url=ACS,
    metadata_url=SP,
    idp_entity_id=IDP,
    idp_metadata_file="/unused",
    sp_key_file="/unused",
    sp_cert_file="/unused",
    role_mappings=(RoleMapping(attribute="role", values={"admins": ("admin",)}),),
)
CONFIRMATION = Confirmation(
    method=BEARER,
    recipient=ACS,
    in_response_to="_req",
    not_before=None,
    not_on_or_after=instant(300),
)
FACTS = VerifiedFacts(
    response_issuer=IDP,
    destination=ACS,
    in_response_to="_req",
    response_signed=False,
    assertion_id="_a1",
    assertion_issuer=IDP,
    assertion_signed=True,
    name_id="alice@corp.example",
    name_id_format=NAMEID_EMAIL,
    confirmations=(CONFIRMATION,),
    has_conditions=True,
    audience_restrictions=((SP,),),
    not_before=instant(-10),
    not_on_or_after=instant(600),
    session_not_on_or_after=instant(3600),
    attributes=(Attribute(name="urn:x:role", friendly_name="role", values=("admins", "x")),),
)


def accept(facts: VerifiedFacts = FACTS, config: SamlSpConfig = CONFIG) -> Any:
    return decide(facts, config, expected_request_id="_req", now=NOW)


def refusal(**changes: Any) -> str:
    with pytest.raises(AuthError) as refused:
        accept(msgspec.structs.replace(FACTS, **changes))
    assert refused.value.status == 401
    return refused.value.reason


def test_accepted_principal() -> None:
    accepted = accept()
    principal = accepted.principal
    assert (principal.id, principal.issuer, principal.auth_method) == (
        "alice@corp.example",
        IDP,
        "saml",
    )
    assert principal.roles == ("admin",)
    assert principal.token_id == "_a1"
    assert principal.expires_at == NOW + 3600
    # Remembered until the later of the two NotOnOrAfter values, plus the skew.
    assert accepted.replay_until == NOW + 600 + CONFIG.clock_skew_seconds


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"assertion_issuer": "https://rogue.test"}, "saml_wrong_issuer"),
        ({"assertion_issuer": None}, "saml_wrong_issuer"),
        ({"response_issuer": "https://rogue.test"}, "saml_wrong_issuer"),
        ({"assertion_signed": False}, "saml_unsigned"),
        ({"assertion_signed": False, "response_signed": True}, "saml_unsigned"),
        ({"destination": "https://other.test/acs"}, "saml_wrong_destination"),
        ({"destination": None}, "saml_wrong_destination"),
        ({"in_response_to": "_other"}, "saml_unknown_request"),
        ({"in_response_to": None}, "saml_unknown_request"),
        ({"confirmations": ()}, "saml_wrong_recipient"),
        (
            {"confirmations": (msgspec.structs.replace(CONFIRMATION, recipient="https://x/acs"),)},
            "saml_wrong_recipient",
        ),
        (
            {"confirmations": (msgspec.structs.replace(CONFIRMATION, in_response_to="_o"),)},
            "saml_wrong_recipient",
        ),
        (
            {"confirmations": (msgspec.structs.replace(CONFIRMATION, method="urn:x:vouches"),)},
            "saml_wrong_recipient",
        ),
        (
            {"confirmations": (msgspec.structs.replace(CONFIRMATION, not_on_or_after=None),)},
            "saml_bad_confirmation",
        ),
        (
            {
                "confirmations": (
                    msgspec.structs.replace(CONFIRMATION, not_on_or_after=instant(-61)),
                )
            },
            "saml_expired",
        ),
        (
            {"confirmations": (msgspec.structs.replace(CONFIRMATION, not_before=instant(61)),)},
            "saml_not_yet_valid",
        ),
        ({"not_on_or_after": instant(-61)}, "saml_expired"),
        ({"not_before": instant(61)}, "saml_not_yet_valid"),
        ({"not_before": "2026-01-01T00:00:00+01:00"}, "saml_bad_time"),
        ({"not_on_or_after": "tomorrowZ"}, "saml_bad_time"),
        ({"has_conditions": False, "audience_restrictions": ()}, "saml_wrong_audience"),
        ({"audience_restrictions": ()}, "saml_wrong_audience"),
        ({"audience_restrictions": (("https://other.test",),)}, "saml_wrong_audience"),
        ({"audience_restrictions": ((SP,), ("https://other.test",))}, "saml_wrong_audience"),
        ({"name_id": None}, "saml_bad_subject"),
        ({"name_id": ""}, "saml_bad_subject"),
        ({"name_id": " alice"}, "saml_bad_subject"),
        ({"name_id": "alice\nadmin"}, "saml_bad_subject"),
        ({"name_id": "a" * 1025}, "saml_bad_subject"),
        ({"name_id_format": NAMEID_TRANSIENT}, "saml_bad_subject"),
    ],
)
def test_refused(changes: dict[str, Any], expected: str) -> None:
    assert refusal(**changes) == expected


def test_response_signature_enough_only_under_lenient_policy() -> None:
    facts = msgspec.structs.replace(FACTS, assertion_signed=False, response_signed=True)
    lenient = msgspec.structs.replace(CONFIG, signature_policy="assertion_or_response")
    assert accept(facts, lenient).principal.id == "alice@corp.example"


def test_skew_tolerated_up_to_its_bound() -> None:
    late = msgspec.structs.replace(
        FACTS,
        not_on_or_after=instant(-59),
        confirmations=(msgspec.structs.replace(CONFIRMATION, not_on_or_after=instant(-59)),),
    )
    assert accept(late).principal.id == "alice@corp.example"


def test_one_good_confirmation_among_others_is_enough() -> None:
    other = msgspec.structs.replace(CONFIRMATION, recipient="https://x/acs")
    assert accept(msgspec.structs.replace(FACTS, confirmations=(other, CONFIRMATION)))


def test_absent_name_id_format_means_unspecified() -> None:
    assert accept(msgspec.structs.replace(FACTS, name_id_format=None)).principal


def test_map_roles_by_name_or_friendly_name_merged_in_rule_order() -> None:
    attributes = (
        Attribute(name="urn:oid:1", friendly_name="affiliation", values=("staff", "faculty")),
        Attribute(name="groups", friendly_name=None, values=("eng", "ops", "bad\nrole", "")),
    )
    rules = (
        RoleMapping(attribute="affiliation", values={"faculty": ("writer", "reader")}),
        RoleMapping(attribute="urn:oid:1", values={"staff": ("reader",)}),
        RoleMapping(attribute="groups", copy_values=True),
        RoleMapping(attribute="missing", copy_values=True),
    )
    assert map_roles(attributes, rules) == ("writer", "reader", "eng", "ops")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(max_size=12), max_size=6),
    st.dictionaries(
        st.text(max_size=6), st.lists(st.text(max_size=6), max_size=3).map(tuple), max_size=4
    ),
)
def test_roles_only_from_rules(values: list[str], mapping: dict[str, tuple[str, ...]]) -> None:
    attributes = (Attribute(name="a", friendly_name=None, values=tuple(values)),)
    roles = map_roles(attributes, (RoleMapping(attribute="a", values=mapping),))
    granted = {role for value in values for role in mapping.get(value, ())}
    assert set(roles) == granted
    assert len(roles) == len(set(roles))
