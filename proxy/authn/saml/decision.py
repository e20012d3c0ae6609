"""The SAML acceptance rules, as a pure function of verified facts.

pysaml2 checks the signatures (with xmlsec1, against the IdP metadata only) and parses the
response; some of its other checks are lenient (no AudienceRestriction means "any
audience", a missing Recipient is not an error without conversation info, times are
optional). `decide()` therefore re-states every rule on the facts pysaml2 verified and
accepts only when all of them hold:

- the response and the assertion were issued by the configured IdP;
- the assertion is signed (or, under `assertion_or_response`, the response is);
- `Destination` is our ACS URL; the response's and the bearer confirmation's
  `InResponseTo` name the AuthnRequest we issued;
- a bearer `SubjectConfirmation` names our ACS URL as `Recipient` and has a
  `NotOnOrAfter` still in the future (within the skew);
- `Conditions` carry at least one `AudienceRestriction`, each naming our entity id, and
  their `NotBefore`/`NotOnOrAfter` hold within the skew;
- the `NameID` has an allowed format and is a non-empty printable string.
The result is the `Principal` plus how long the assertion id must be remembered.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from proxy.authn.principal import AuthError, Principal
from proxy.authn.saml.config import NAMEID_UNSPECIFIED, RoleMapping, SamlSpConfig

BEARER = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
MAX_NAME_ID_CHARS = 1024


class Confirmation(msgspec.Struct, frozen=True, kw_only=True):
    """One `SubjectConfirmation` of the assertion."""

    method: str | None
    recipient: str | None
    in_response_to: str | None
    not_before: str | None
    not_on_or_after: str | None


class Attribute(msgspec.Struct, frozen=True, kw_only=True):
    """One SAML attribute with its text values."""

    name: str
    friendly_name: str | None
    values: tuple[str, ...]


class VerifiedFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the signature-checked response says, copied out of pysaml2's objects."""

    response_issuer: str | None
    destination: str | None
    in_response_to: str | None
    response_signed: bool
    assertion_id: str
    assertion_issuer: str | None
    assertion_signed: bool
    name_id: str | None
    name_id_format: str | None
    confirmations: tuple[Confirmation, ...]
    has_conditions: bool
    audience_restrictions: tuple[tuple[str, ...], ...]
    not_before: str | None
    not_on_or_after: str | None
    session_not_on_or_after: str | None
    attributes: tuple[Attribute, ...]


class Accepted(msgspec.Struct, frozen=True, kw_only=True):
    """A login the SP accepts, and until when its assertion id must not be seen again."""

    principal: Principal
    assertion_id: str
    replay_until: float


def parse_instant(value: str, field: str) -> float:
    """Seconds since the epoch of an xs:dateTime in UTC (`...Z`), or a 401 naming the field."""
    if not value.endswith("Z"):
        raise AuthError("saml_bad_time", detail=f"{field} must be UTC (end in Z)")
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise AuthError("saml_bad_time", detail=f"{field} is not a dateTime") from None


def _printable(value: str) -> bool:
    return value.isprintable() and value.strip() == value


def map_roles(attributes: tuple[Attribute, ...], rules: tuple[RoleMapping, ...]) -> tuple[str, ...]:
    """Roles granted by the rules, in rule order, without duplicates."""
    by_name: dict[str, list[str]] = {}
    for attribute in attributes:
        for key in {attribute.name, attribute.friendly_name}:
            if key:
                by_name.setdefault(key, []).extend(attribute.values)
    roles: dict[str, None] = {}
    for rule in rules:
        for value in by_name.get(rule.attribute, ()):
            if rule.copy_values and value and _printable(value):
                roles[value] = None
            for role in rule.values.get(value, ()):
                roles[role] = None
    return tuple(roles)


def _check_times(facts: VerifiedFacts, now: float, skew: int) -> float:
    """Conditions and the bearer window; returns the latest instant the assertion matters."""
    latest = now
    if facts.not_before is not None and parse_instant(facts.not_before, "NotBefore") > now + skew:
        raise AuthError("saml_not_yet_valid", detail="Conditions NotBefore is in the future")
    if facts.not_on_or_after is not None:
        expiry = parse_instant(facts.not_on_or_after, "NotOnOrAfter")
        if expiry <= now - skew:
            raise AuthError("saml_expired", detail="Conditions NotOnOrAfter has passed")
        latest = max(latest, expiry)
    return latest


def _bearer_window(confirmation: Confirmation, now: float, skew: int) -> float:
    if confirmation.not_on_or_after is None:
        raise AuthError("saml_bad_confirmation", detail="bearer confirmation without NotOnOrAfter")
    expiry = parse_instant(confirmation.not_on_or_after, "SubjectConfirmationData NotOnOrAfter")
    if expiry <= now - skew:
        raise AuthError("saml_expired", detail="SubjectConfirmationData NotOnOrAfter has passed")
    if confirmation.not_before is not None and (
        parse_instant(confirmation.not_before, "SubjectConfirmationData NotBefore") > now + skew
    ):
        raise AuthError("saml_not_yet_valid", detail="SubjectConfirmationData NotBefore is ahead")
    return expiry


def decide(
    facts: VerifiedFacts,
    config: SamlSpConfig,
    *,
    expected_request_id: str,
    now: float,
) -> Accepted:
    """Accept the verified response as a login, or raise `AuthError` saying which rule failed."""
    idp = config.idp_entity_id
    if facts.assertion_issuer != idp or facts.response_issuer not in (None, idp):
        raise AuthError("saml_wrong_issuer", detail="issuer is not the configured IdP")
    if not facts.assertion_signed and not (
        config.signature_policy == "assertion_or_response" and facts.response_signed
    ):
        raise AuthError("saml_unsigned", detail="no valid IdP signature covers the assertion")
    if facts.destination != config.acs_url:
        raise AuthError("saml_wrong_destination", detail="Destination is not our ACS URL")
    if facts.in_response_to != expected_request_id:
        raise AuthError("saml_unknown_request", detail="InResponseTo is not our request")

    skew = config.clock_skew_seconds
    latest = _check_times(facts, now, skew)
    windows = [
        _bearer_window(c, now, skew)
        for c in facts.confirmations
        if c.method == BEARER
        and c.recipient == config.acs_url
        and c.in_response_to == expected_request_id
    ]
    if not windows:
        raise AuthError(
            "saml_wrong_recipient",
            detail="no bearer confirmation for our ACS URL and request",
        )
    latest = max(latest, *windows)

    if not facts.has_conditions or not facts.audience_restrictions:
        raise AuthError("saml_wrong_audience", detail="assertion has no AudienceRestriction")
    if not all(config.entity_id in audiences for audiences in facts.audience_restrictions):
        raise AuthError("saml_wrong_audience", detail="assertion is meant for another audience")

    name_id = facts.name_id
    if name_id is None or not name_id or len(name_id) > MAX_NAME_ID_CHARS:
        raise AuthError("saml_bad_subject", detail="NameID is missing, empty or too long")
    if not _printable(name_id):
        raise AuthError("saml_bad_subject", detail="NameID holds whitespace or control characters")
    if (facts.name_id_format or NAMEID_UNSPECIFIED) not in config.allowed_name_id_formats:
        raise AuthError("saml_bad_subject", detail="NameID format not allowed")

    session_end = (
        parse_instant(facts.session_not_on_or_after, "SessionNotOnOrAfter")
        if facts.session_not_on_or_after is not None
        else None
    )
    principal = Principal(
        id=name_id,
        issuer=idp,
        auth_method="saml",
        roles=map_roles(facts.attributes, config.role_mappings),
        token_id=facts.assertion_id,
        expires_at=session_end,
    )
    return Accepted(
        principal=principal, assertion_id=facts.assertion_id, replay_until=latest + skew
    )
