"""SAML service-provider configuration: declared once, validated at start.

`SamlSpConfig` is the YAML shape (frozen msgspec structs, each field documented where it is
declared). `ServiceProvider.load()` checks the combinations, reads the key, certificate and
IdP metadata, and builds the pysaml2 configuration once, so a bad file or URL fails at start
with a message naming the field, never at the first login.

Every URL the SP announces or checks (entity id, ACS, metadata) comes from here: nothing is
ever derived from a request's `Host` header.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec

SignaturePolicy = Literal["assertion", "assertion_or_response"]

NAMEID_EMAIL = "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress"
NAMEID_PERSISTENT = "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent"
NAMEID_UNSPECIFIED = "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified"
NAMEID_TRANSIENT = "urn:oasis:names:tc:SAML:2.0:nameid-format:transient"
XMLSEC_BINARY = "/usr/bin/xmlsec1"
METADATA_FETCH_TIMEOUT_S = 10


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class SamlConfigError(ValueError):
    """A SAML configuration that cannot be used; the message names the field."""


class RoleMapping(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one SAML attribute of the verified assertion becomes roles of the principal."""

    attribute: Annotated[
        str,
        msgspec.Meta(min_length=1),
        _doc(
            "Attribute to read, matched against the attribute's `Name` (e.g. "
            "`urn:oid:1.3.6.1.4.1.5923.1.1.1.7`) or its `FriendlyName`."
        ),
    ]
    values: Annotated[
        dict[str, tuple[str, ...]],
        _doc("Attribute value -> roles granted when the attribute carries that value."),
    ] = {}
    copy_values: Annotated[
        bool,
        _doc("When true, every value of the attribute is also taken as a role, unchanged."),
    ] = False


class SamlSpConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The sidecar as a SAML 2.0 service provider for one identity provider."""

    entity_id: Annotated[
        str,
        msgspec.Meta(min_length=1),
        _doc("This SP's entity id; the only accepted `Audience`. Usually its metadata URL."),
    ]
    acs_url: Annotated[
        str,
        msgspec.Meta(min_length=1),
        _doc(
            "Absolute URL of the assertion consumer service (ending in `/acs`), as the browser "
            "reaches it; the only accepted `Destination` and `Recipient`."
        ),
    ]
    metadata_url: Annotated[
        str,
        msgspec.Meta(min_length=1),
        _doc("Absolute URL where the SP metadata is published (same prefix as acs_url)."),
    ]
    idp_entity_id: Annotated[
        str,
        msgspec.Meta(min_length=1),
        _doc("Entity id of the one trusted IdP; responses from any other issuer are refused."),
    ]
    idp_metadata_file: Annotated[
        str | None,
        _doc("IdP metadata XML file (signing certificate and SSO endpoint). Or idp_metadata_url."),
    ] = None
    idp_metadata_url: Annotated[
        str | None,
        _doc("IdP metadata URL (https), fetched once at start. Or idp_metadata_file."),
    ] = None
    idp_metadata_cert_file: Annotated[
        str | None,
        _doc(
            "PEM certificate that signs the metadata at idp_metadata_url; when set, metadata "
            "that is unsigned or signed by another key is refused at start."
        ),
    ] = None
    sp_key_file: Annotated[
        str, msgspec.Meta(min_length=1), _doc("PEM private key of the SP (signs AuthnRequests).")
    ]
    sp_cert_file: Annotated[
        str, msgspec.Meta(min_length=1), _doc("PEM certificate of the SP, published in metadata.")
    ]
    sign_authn_requests: Annotated[
        bool, _doc("Sign AuthnRequests (redirect binding, RSA-SHA256).")
    ] = True
    signature_policy: Annotated[
        SignaturePolicy,
        _doc(
            "`assertion` (default): the assertion itself must carry a valid IdP signature. "
            "`assertion_or_response`: a valid signature on the enclosing response, which "
            "covers the assertion, is also enough."
        ),
    ] = "assertion"
    allowed_name_id_formats: Annotated[
        tuple[str, ...],
        msgspec.Meta(min_length=1),
        _doc("NameID formats accepted as principal id (transient ids are not stable ids)."),
    ] = (NAMEID_PERSISTENT, NAMEID_EMAIL, NAMEID_UNSPECIFIED)
    role_mappings: Annotated[
        tuple[RoleMapping, ...], _doc("Attribute -> role rules; roles from all rules are merged.")
    ] = ()
    allow_sha1_signatures: Annotated[
        bool,
        _doc("Accept RSA-SHA1 signatures and SHA-1 digests (legacy IdPs only; off by default)."),
    ] = False
    clock_skew_seconds: Annotated[
        int,
        msgspec.Meta(ge=0, le=300),
        _doc("Tolerated clock difference with the IdP for NotBefore/NotOnOrAfter (at most 300)."),
    ] = 60
    request_ttl_seconds: Annotated[
        int,
        msgspec.Meta(ge=30, le=3600),
        _doc("How long an issued AuthnRequest id stays acceptable as InResponseTo."),
    ] = 600
    bind_to_browser: Annotated[
        bool,
        _doc(
            "Bind each AuthnRequest to the browser that started it (a cookie checked at the "
            "ACS), so a response obtained by someone else cannot log this browser in "
            "(login CSRF). Needs HTTPS in browsers: the cookie is SameSite=None; Secure."
        ),
    ] = True
    cookie_secure: Annotated[
        bool, _doc("Mark the binding cookie Secure. Turn off only for plain-HTTP tests.")
    ] = True
    max_response_bytes: Annotated[
        int,
        msgspec.Meta(ge=4096, le=4 * 1024 * 1024),
        _doc("Largest accepted ACS POST body; larger ones are refused before any parsing."),
    ] = 256 * 1024
    xmlsec_binary: Annotated[
        str, _doc("Path of the xmlsec1 binary pysaml2 uses to verify signatures.")
    ] = XMLSEC_BINARY


def _absolute_url(field: str, value: str) -> tuple[str, str]:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise SamlConfigError(f"saml.{field}: must be an absolute http(s) URL, got {value!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise SamlConfigError(f"saml.{field}: must not carry user info, query or fragment")
    return f"{parts.scheme}://{parts.netloc}", parts.path


def _readable(field: str, path: str) -> None:
    if not os.access(path, os.R_OK) or not Path(path).is_file():
        raise SamlConfigError(f"saml.{field}: cannot read file {path!r}")


def check(config: SamlSpConfig) -> str:
    """Validate field combinations; return the path prefix the sub-application mounts at."""
    acs_origin, acs_path = _absolute_url("acs_url", config.acs_url)
    meta_origin, meta_path = _absolute_url("metadata_url", config.metadata_url)
    if not acs_path.endswith("/acs") or acs_path == "/acs":
        raise SamlConfigError("saml.acs_url: path must end in /acs below a prefix, e.g. /saml/acs")
    prefix = acs_path.removesuffix("/acs")
    if meta_origin != acs_origin or meta_path != f"{prefix}/metadata":
        raise SamlConfigError(f"saml.metadata_url: must be {acs_origin}{prefix}/metadata")
    if (config.idp_metadata_file is None) == (config.idp_metadata_url is None):
        raise SamlConfigError("saml: set exactly one of idp_metadata_file, idp_metadata_url")
    if config.idp_metadata_url is not None and urlsplit(config.idp_metadata_url).scheme != "https":
        raise SamlConfigError("saml.idp_metadata_url: must be https")
    if config.idp_metadata_file is not None:
        _readable("idp_metadata_file", config.idp_metadata_file)
    if config.idp_metadata_cert_file is not None:
        _readable("idp_metadata_cert_file", config.idp_metadata_cert_file)
    _readable("sp_key_file", config.sp_key_file)
    _readable("sp_cert_file", config.sp_cert_file)
    if not os.access(config.xmlsec_binary, os.X_OK):
        raise SamlConfigError(f"saml.xmlsec_binary: {config.xmlsec_binary!r} is not executable")
    return prefix


def pysaml2_settings(config: SamlSpConfig) -> dict[str, Any]:
    """The pysaml2 SPConfig dictionary: strict settings, keys only from the IdP metadata."""
    metadata: dict[str, Any]
    if config.idp_metadata_file is not None:
        metadata = {"local": [config.idp_metadata_file]}
    else:
        remote: dict[str, Any] = {"url": config.idp_metadata_url}
        if config.idp_metadata_cert_file is not None:
            remote["cert"] = config.idp_metadata_cert_file
        metadata = {"remote": [remote]}
    return {
        "entityid": config.entity_id,
        "key_file": config.sp_key_file,
        "cert_file": config.sp_cert_file,
        "xmlsec_binary": config.xmlsec_binary,
        "metadata": metadata,
        "accepted_time_diff": config.clock_skew_seconds,
        # Metadata is fetched once at start (TLS verified by pysaml2's default); bound it.
        "http_client_timeout": METADATA_FETCH_TIMEOUT_S,
        # Never trust a certificate that travels inside the message (KeyInfo).
        "only_use_keys_in_metadata": True,
        "allow_unknown_attributes": True,
        "service": {
            "sp": {
                "endpoints": {
                    "assertion_consumer_service": [
                        (config.acs_url, "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST")
                    ],
                },
                "allow_unsolicited": False,
                "authn_requests_signed": config.sign_authn_requests,
                "want_assertions_signed": config.signature_policy == "assertion",
                "want_response_signed": False,
                "want_assertions_or_response_signed": (
                    config.signature_policy == "assertion_or_response"
                ),
                "name_id_format": list(config.allowed_name_id_formats),
                "name_id_format_allow_create": False,
            }
        },
    }
