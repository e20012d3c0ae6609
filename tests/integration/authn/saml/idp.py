"""A real SAML identity provider for tests: pysaml2's IdP side, keys made at test time.

`IdentityProvider` wraps `saml2.server.Server`: it publishes metadata, parses (and checks
the signature of) the SP's redirect-binding AuthnRequest, and issues real responses signed
with xmlsec1. `edit_and_resign()` lets a test change a signed response and sign it again
(with the IdP key or another one), to build responses a real IdP would sign but the SP
must still refuse (wrong audience, expired, ...). `edit()` changes it WITHOUT re-signing,
for signature-wrapping and tampering attacks.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree as ET

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from saml2 import BINDING_HTTP_REDIRECT
from saml2.config import IdPConfig
from saml2.metadata import entity_descriptor
from saml2.saml import NAME_FORMAT_URI, NAMEID_FORMAT_EMAILADDRESS, NameID
from saml2.server import Server
from saml2.xmldsig import DIGEST_SHA256, SIG_RSA_SHA256

SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
DS = "http://www.w3.org/2000/09/xmldsig#"
ASSERTION_NODE = f"{SAML}:Assertion"
RESPONSE_NODE = f"{SAMLP}:Response"
PASSWORD_CONTEXT = "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"

for prefix, uri in (("samlp", SAMLP), ("saml", SAML), ("ds", DS)):
    ET.register_namespace(prefix, uri)


@dataclass(frozen=True)
class KeyPair:
    """A PEM private key file and its self-signed certificate file."""

    key_file: str
    cert_file: str


def make_keypair(directory: Path, name: str) -> KeyPair:
    """A fresh RSA-2048 key and a self-signed certificate valid from yesterday for 30 days."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = directory / f"{name}.key", directory / f"{name}.crt"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return KeyPair(str(key_file), str(cert_file))


@dataclass(frozen=True)
class AuthnRequestSeen:
    """What the IdP learned from the SP's AuthnRequest."""

    request_id: str
    acs_url: str
    sp_entity_id: str
    signed: bool


class IdentityProvider:
    """pysaml2's IdP, trusting exactly the SP metadata it is given."""

    def __init__(self, directory: Path, entity_id: str, keys: KeyPair) -> None:
        self.entity_id = entity_id
        self.keys = keys
        self.directory = directory
        self._settings: dict[str, Any] = {
            "entityid": entity_id,
            "key_file": keys.key_file,
            "cert_file": keys.cert_file,
            "xmlsec_binary": "/usr/bin/xmlsec1",
            "service": {
                "idp": {
                    "endpoints": {
                        "single_sign_on_service": [
                            (f"{entity_id}/sso/redirect", BINDING_HTTP_REDIRECT)
                        ]
                    },
                    "policy": {
                        "default": {
                            "lifetime": {"minutes": 5},
                            "attribute_restrictions": None,
                            "name_form": NAME_FORMAT_URI,
                        }
                    },
                    "name_id_format": [NAMEID_FORMAT_EMAILADDRESS],
                    "want_authn_requests_signed": True,
                }
            },
        }
        config = IdPConfig()
        config.load(dict(self._settings))
        slug = entity_id.split("//")[-1].replace("/", "_")
        self.metadata_file = directory / f"idp-{slug}.xml"
        self.metadata_file.write_text(str(entity_descriptor(config)), encoding="utf-8")
        self._server: Server | None = None

    def trust_sp(self, sp_metadata: bytes) -> None:
        """Load the SP's metadata (as served by the SP) and start the IdP."""
        sp_file = self.directory / "sp-metadata.xml"
        sp_file.write_bytes(sp_metadata)
        config = IdPConfig()
        config.load({**self._settings, "metadata": {"local": [str(sp_file)]}})
        self._server = Server(config=config)

    @property
    def server(self) -> Server:
        assert self._server is not None, "call trust_sp() first"
        return self._server

    def receive(self, location: str) -> AuthnRequestSeen:
        """Parse the redirect-binding AuthnRequest, checking its signature when present."""
        query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
        request = self.server.parse_authn_request(
            query["SAMLRequest"],
            BINDING_HTTP_REDIRECT,
            relay_state=query.get("RelayState"),
            sigalg=query.get("SigAlg"),
            signature=query.get("Signature"),
        )
        message = request.message
        return AuthnRequestSeen(
            request_id=message.id,
            acs_url=message.assertion_consumer_service_url,
            sp_entity_id=message.issuer.text,
            signed="Signature" in query,
        )

    def respond(
        self,
        request: AuthnRequestSeen,
        *,
        name_id: str = "alice@corp.example",
        attributes: Mapping[str, Sequence[str]] | None = None,
        sign_assertion: bool = True,
        sign_response: bool = False,
        session_not_on_or_after: str | None = None,
    ) -> str:
        """A real authn response (XML) to the request, signed as asked."""
        identity = {k: list(v) for k, v in (attributes or {}).items()}
        xml = self.server.create_authn_response(
            identity,
            in_response_to=request.request_id,
            destination=request.acs_url,
            sp_entity_id=request.sp_entity_id,
            name_id=NameID(format=NAMEID_FORMAT_EMAILADDRESS, text=name_id),
            authn={"class_ref": PASSWORD_CONTEXT},
            sign_assertion=sign_assertion,
            sign_response=sign_response,
            sign_alg=SIG_RSA_SHA256,
            digest_alg=DIGEST_SHA256,
            session_not_on_or_after=session_not_on_or_after,
        )
        return str(xml)

    def sign(self, xml: str, node: str, node_id: str, key_file: str | None = None) -> str:
        """Sign (or re-sign) the element with `node_id`; its Signature template must exist."""
        signed = self.server.sec.sign_statement(
            xml, node_name=node, key_file=key_file or self.keys.key_file, node_id=node_id
        )
        return str(signed)


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)


def serialize(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode")


def assertion_of(root: ET.Element) -> ET.Element:
    found = root.find(f"{{{SAML}}}Assertion")
    assert found is not None
    return found


def edit(xml: str, change: Callable[[ET.Element], None]) -> str:
    """The response changed by `change`, signatures left as they were."""
    root = parse(xml)
    change(root)
    return serialize(root)


def edit_and_resign(
    idp: IdentityProvider,
    xml: str,
    change: Callable[[ET.Element], None],
    *,
    key_file: str | None = None,
) -> str:
    """The response changed by `change`, then every signature in it made valid again."""
    root = parse(xml)
    change(root)
    text = serialize(root)
    root = parse(text)
    assertion = assertion_of(root)
    if assertion.find(f"{{{DS}}}Signature") is not None:
        text = idp.sign(text, ASSERTION_NODE, assertion.get("ID", ""), key_file)
    if root.find(f"{{{DS}}}Signature") is not None:
        text = idp.sign(text, RESPONSE_NODE, root.get("ID", ""), key_file)
    return text


def post_body(xml: str | bytes) -> dict[str, str]:
    raw = xml.encode("utf-8") if isinstance(xml, str) else xml
    return {"SAMLResponse": base64.b64encode(raw).decode("ascii")}
