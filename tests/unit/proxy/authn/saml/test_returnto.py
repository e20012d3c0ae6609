"""The post-login redirect guard: only paths on this site, whatever the input."""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.authn.saml.returnto import MAX_RETURN_TO_CHARS, UnsafeReturnTo, local_return_path

SITE = "https://sp.test/saml/login"


def browser_target(value: str) -> tuple[str, str]:
    """Where a browser would go: it strips tab/CR/LF and treats `\\` like `/` (WHATWG URL)."""
    cleaned = value.replace("\t", "").replace("\n", "").replace("\r", "").replace("\\", "/")
    parts = urlsplit(urljoin(SITE, cleaned.strip()))
    return parts.scheme, parts.netloc


@pytest.mark.parametrize(
    "value",
    [
        "https://evil.example/",
        "//evil.example",
        "///evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "/\t/evil.example",
        "/\n/evil.example",
        " //evil.example",
        "javascript:alert(1)",
        "http:evil.example",
        "evil.example/path",
        "../x",
        "/ok\x00",
        "/caf\u00e9",
        "/" + "a" * MAX_RETURN_TO_CHARS,
    ],
)
def test_offsite_or_odd_values_refused(value: str) -> None:
    with pytest.raises(UnsafeReturnTo):
        local_return_path(value)


@pytest.mark.parametrize(
    "value", ["/", "/data/report", "/a?b=c&d=//e", "/x#frag", "/%2F%2Fevil.example", "/a:b"]
)
def test_local_paths_kept_unchanged(value: str) -> None:
    assert local_return_path(value) == value


@pytest.mark.parametrize("value", [None, ""])
def test_absent_means_site_root(value: str | None) -> None:
    assert local_return_path(value) == "/"


PIECES = st.sampled_from(
    [
        "/",
        "//",
        "\\",
        "\t",
        "\n",
        " ",
        ":",
        "@",
        "?",
        "#",
        "%2F",
        "%5C",
        ".",
        "..",
        "http:",
        "https:",
        "javascript:",
        "evil.example",
        "a",
        "\x00",
        "\u3002",
        "\uff0f",
    ]
)
HOSTILE = st.lists(PIECES, max_size=8).map("".join) | st.text(max_size=40)


@settings(max_examples=400, deadline=None)
@given(HOSTILE)
def test_accepted_values_stay_on_this_site(value: str) -> None:
    try:
        accepted = local_return_path(value)
    except UnsafeReturnTo:
        return
    assert browser_target(accepted) == ("https", "sp.test")
    assert accepted.startswith("/")
    assert not accepted.startswith("//")
    assert "\\" not in accepted


SAFE_CHARS = st.sampled_from("abcxyz0129-._~!$&'()*+,;=:@/?%#")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abcxyz0129-._~", min_size=1, max_size=5), st.text(SAFE_CHARS, max_size=30))
def test_ordinary_local_paths_accepted(first: str, rest: str) -> None:
    path = f"/{first}{rest}"
    assert local_return_path(path) == path
