"""The service provider built once from configuration: pysaml2 client, metadata, checks.

`ServiceProvider.load()` validates the configuration, loads the IdP metadata (only its
certificates are ever used to verify signatures) and renders the SP metadata once.
`start_login()` builds a redirect-binding AuthnRequest. `verify()` hands an already
shape-checked response (see `message.inspect_response`) to pysaml2, which verifies the
signatures with xmlsec1 and the protocol details it knows, and copies the verified facts
out for `decision.decide()`. `verify()` runs xmlsec1 as a subprocess: call it from a
worker thread, never on the event loop.
"""

from __future__ import annotations

import base64
import logging
from typing import Any
from urllib.parse import urlsplit

from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT
from saml2.client import Saml2Client
from saml2.config import SPConfig
from saml2.metadata import entity_descriptor
from saml2.response import StatusError
from saml2.s_utils import UnknownSystemEntity
from saml2.xmldsig import SIG_RSA_SHA256

from proxy.authn.principal import AuthError
from proxy.authn.saml.config import SamlConfigError, SamlSpConfig, check, pysaml2_settings
from proxy.authn.saml.decision import Attribute, Confirmation, VerifiedFacts
from proxy.authn.saml.message import ResponseShape

log = logging.getLogger(__name__)


class _ForgetIdentities:
    """pysaml2 keeps every login's attributes in an in-memory cache; a proxy must not."""

    def set(self, *args: object, **kwargs: object) -> None:
        return None


def _text(element: Any) -> str | None:
    if element is None or element.text is None:
        return None
    return str(element.text).strip()


def facts_from(response: Any) -> VerifiedFacts:
    """Copy what the verified pysaml2 `AuthnResponse` says into plain values."""
    message, assertion = response.response, response.assertion
    if assertion is None:
        raise AuthError("saml_rejected", detail="no assertion after verification")
    subject = assertion.subject
    confirmations = tuple(
        Confirmation(
            method=sc.method,
            recipient=getattr(sc.subject_confirmation_data, "recipient", None),
            in_response_to=getattr(sc.subject_confirmation_data, "in_response_to", None),
            not_before=getattr(sc.subject_confirmation_data, "not_before", None),
            not_on_or_after=getattr(sc.subject_confirmation_data, "not_on_or_after", None),
        )
        for sc in (subject.subject_confirmation if subject is not None else [])
    )
    conditions = assertion.conditions
    restrictions = tuple(
        tuple(a.text.strip() for a in restriction.audience if a.text)
        for restriction in (conditions.audience_restriction if conditions is not None else [])
    )
    attributes = tuple(
        Attribute(
            name=attribute.name,
            friendly_name=attribute.friendly_name,
            values=tuple(v.text for v in attribute.attribute_value if v.text is not None),
        )
        for statement in assertion.attribute_statement
        for attribute in statement.attribute
    )
    name_id = subject.name_id if subject is not None else None
    statements = assertion.authn_statement
    return VerifiedFacts(
        response_issuer=_text(message.issuer),
        destination=message.destination,
        in_response_to=message.in_response_to,
        response_signed=message.signature is not None,
        assertion_id=assertion.id,
        assertion_issuer=_text(assertion.issuer),
        assertion_signed=assertion.signature is not None,
        # The raw text, not stripped: a NameID padded with whitespace is refused later.
        name_id=name_id.text if name_id is not None else None,
        name_id_format=name_id.format if name_id is not None else None,
        confirmations=confirmations,
        has_conditions=conditions is not None,
        audience_restrictions=restrictions,
        not_before=conditions.not_before if conditions is not None else None,
        not_on_or_after=conditions.not_on_or_after if conditions is not None else None,
        session_not_on_or_after=statements[0].session_not_on_or_after if statements else None,
        attributes=attributes,
    )


class ServiceProvider:
    """One configured SAML SP; immutable after `load()`, shared by all requests."""

    def __init__(self, config: SamlSpConfig, client: Saml2Client, mount_prefix: str) -> None:
        self.config = config
        self.mount_prefix = mount_prefix
        self._client = client
        self.metadata_xml = str(entity_descriptor(client.config)).encode("utf-8")

    @classmethod
    def load(cls, config: SamlSpConfig) -> ServiceProvider:
        """Check the configuration and load the IdP metadata, or raise `SamlConfigError`."""
        prefix = check(config)
        sp_config = SPConfig()
        try:
            sp_config.load(pysaml2_settings(config))
        except Exception as exc:  # pysaml2 raises anything from bad files
            raise SamlConfigError(f"saml: cannot load SP keys or IdP metadata: {exc}") from exc
        client = Saml2Client(sp_config, identity_cache=_ForgetIdentities())
        metadata = client.metadata
        idp = config.idp_entity_id
        try:
            sso = metadata.single_sign_on_service(idp, BINDING_HTTP_REDIRECT)
            certs = metadata.certs(idp, "idpsso", "signing")
        except (KeyError, UnknownSystemEntity):
            sso, certs = [], []
        if not sso:
            raise SamlConfigError(
                f"saml.idp_entity_id: no HTTP-Redirect SSO endpoint for {idp!r} in IdP metadata"
            )
        if not certs:
            raise SamlConfigError(
                f"saml.idp_entity_id: no signing certificate for {idp!r} in IdP metadata"
            )
        return cls(config, client, prefix)

    def start_login(self) -> tuple[str, str]:
        """A new AuthnRequest: its id and the IdP URL (redirect binding) to send the browser to."""
        request_id, info = self._client.prepare_for_authenticate(
            entityid=self.config.idp_entity_id,
            binding=BINDING_HTTP_REDIRECT,
            response_binding=BINDING_HTTP_POST,
            sign=self.config.sign_authn_requests,
            sigalg=SIG_RSA_SHA256 if self.config.sign_authn_requests else None,
        )
        location = dict(info["headers"])["Location"]
        if urlsplit(location).scheme not in ("https", "http"):
            raise AuthError("saml_idp_unusable", 503, detail="IdP SSO URL is not http(s)")
        return str(request_id), str(location)

    def verify(self, shape: ResponseShape, *, request_id: str, return_to: str) -> VerifiedFacts:
        """pysaml2's verification of a shape-checked response (blocking: runs xmlsec1)."""
        encoded = base64.b64encode(shape.xml).decode("ascii")
        try:
            response = self._client.parse_authn_request_response(
                encoded, BINDING_HTTP_POST, outstanding={request_id: return_to}
            )
        except StatusError as exc:
            raise AuthError("saml_idp_refused", detail=str(exc)[:200]) from None
        except Exception as exc:  # noqa: BLE001 - pysaml2 signals failed checks with bare Exception
            log.info("saml response rejected by pysaml2: %s: %.300s", type(exc).__name__, exc)
            raise AuthError("saml_rejected", detail=f"{type(exc).__name__}: {exc}"[:300]) from None
        if response is None:
            raise AuthError("saml_rejected", detail="pysaml2 could not use the response")
        return facts_from(response)
