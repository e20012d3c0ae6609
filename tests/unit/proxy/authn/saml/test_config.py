"""SAML configuration: combinations checked at start, errors naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from proxy.authn.saml.config import SamlConfigError, SamlSpConfig, check, pysaml2_settings


@pytest.fixture
def config(tmp_path: Path) -> SamlSpConfig:
    for name in ("idp.xml", "sp.key", "sp.crt"):
        (tmp_path / name).write_text("x")
    return SamlSpConfig(
        entity_id="https://sp.test/sso/saml/metadata",
        acs_url="https://sp.test/sso/saml/acs",
        metadata_url="https://sp.test/sso/saml/metadata",
        idp_entity_id="https://idp.test",
        idp_metadata_file=str(tmp_path / "idp.xml"),
        sp_key_file=str(tmp_path / "sp.key"),
        sp_cert_file=str(tmp_path / "sp.crt"),
    )


def test_mount_prefix_from_acs_url(config: SamlSpConfig) -> None:
    assert check(config) == "/sso/saml"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"acs_url": "/saml/acs"}, "saml.acs_url"),
        ({"acs_url": "ftp://sp.test/saml/acs"}, "saml.acs_url"),
        ({"acs_url": "https://sp.test/acs"}, "saml.acs_url"),
        ({"acs_url": "https://sp.test/saml/consume"}, "saml.acs_url"),
        ({"acs_url": "https://u@sp.test/sso/saml/acs"}, "saml.acs_url"),
        ({"metadata_url": "https://sp.test/metadata"}, "saml.metadata_url"),
        ({"metadata_url": "https://other.test/sso/saml/metadata"}, "saml.metadata_url"),
        ({"idp_metadata_url": "https://idp.test/md"}, "idp_metadata_file, idp_metadata_url"),
        ({"idp_metadata_file": None}, "idp_metadata_file, idp_metadata_url"),
        ({"idp_metadata_file": None, "idp_metadata_url": "http://idp.test/md"}, "idp_metadata_url"),
        ({"idp_metadata_file": "/nonexistent/idp.xml"}, "saml.idp_metadata_file"),
        ({"sp_key_file": "/nonexistent/sp.key"}, "saml.sp_key_file"),
        ({"xmlsec_binary": "/nonexistent/xmlsec1"}, "saml.xmlsec_binary"),
    ],
)
def test_bad_combinations_name_the_field(
    config: SamlSpConfig, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(SamlConfigError, match=field.replace(".", r"\.")):
        check(msgspec.structs.replace(config, **changes))


def test_yaml_shape_is_validated() -> None:
    with pytest.raises(msgspec.ValidationError, match="clock_skew_seconds"):
        msgspec.convert(
            {
                "entity_id": "e",
                "acs_url": "a",
                "metadata_url": "m",
                "idp_entity_id": "i",
                "sp_key_file": "k",
                "sp_cert_file": "c",
                "clock_skew_seconds": 3600,
            },
            SamlSpConfig,
        )


def test_pysaml2_never_trusts_certificates_from_messages(config: SamlSpConfig) -> None:
    settings = pysaml2_settings(config)
    assert settings["only_use_keys_in_metadata"] is True
    assert settings["service"]["sp"]["allow_unsolicited"] is False
    assert settings["service"]["sp"]["want_assertions_signed"] is True
