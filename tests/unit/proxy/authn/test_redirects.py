"""Return-to targets: only local paths and allow-listed https hosts, whatever the spelling."""

from __future__ import annotations

from urllib.parse import unquote, urljoin, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.authn.redirects import check_allowed_hosts, safe_redirect_target

ALLOWED = frozenset({"app.example.com", "xn--bcher-kva.example"})
BASE = "https://app.example.com/oauth2/callback"


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/datasets/sales?view=table#top",
        "/search?q=a%2Fb",
        "/caf%C3%A9",
        "https://app.example.com",
        "https://app.example.com/x?y=1",
        "https://app.example.com:8443/x",
        "https://xn--bcher-kva.example/",
    ],
)
def test_accepts_local_paths_and_allow_listed_hosts(target: str) -> None:
    assert safe_redirect_target(target, ALLOWED) == target


@pytest.mark.parametrize(
    "target",
    [
        "",
        "//evil.example",
        "///evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "/\\/evil.example",
        "https:evil.example",
        "https:/evil.example",
        "https:///evil.example",
        "https://evil.example",
        "https://evil.example/",
        "https://app.example.com.evil.example/",
        "https://app.example.com@evil.example/",
        "https://user:pw@app.example.com/",
        "https://evil.example#@app.example.com",
        "https://evil.example?@app.example.com",
        "https://APP.EXAMPLE.COM/",
        "https://app.example.com./",
        "https://app.example.com:99999/",
        "https://app.example.com:/x",
        "https://app.example.com//evil.example",
        "http://app.example.com/",
        "HTTPS://app.example.com/",
        "http:evil.example",
        " //evil.example",
        "../x",
        "javascript:alert(1)",
        "JaVaScRiPt:alert(1)",
        "data:text/html,<script>",
        "evil.example",
        "?x=1",
        "#frag",
        "/%2F%2Fevil.example",
        "/%2f%2fevil.example",
        "/%5Cevil.example",
        "/%5cevil.example",
        "/%252F%252Fevil.example",
        "/%09/evil.example",
        "/%5C/evil.example",
        "/%2F/evil.example",
        "/x%0d%0aSet-Cookie:a=b",
        "/x?y=%0d%0aLocation:evil",
        "/x%",
        "/x%zz",
        "/\t/evil.example",
        "/\n/evil.example",
        " /x",
        "/x ",
        "/\x00",
        "\t//evil.example",
        "https://bücher.example/",
        "https://\u0430pp.example.com/",  # Cyrillic a
        "/\uff45vil",  # fullwidth e
        "/" + "a" * 3000,
    ],
)
def test_refuses_hostile_targets(target: str) -> None:
    assert safe_redirect_target(target, ALLOWED) is None


def test_empty_allow_list_allows_only_local_paths() -> None:
    assert safe_redirect_target("/x", ()) == "/x"
    assert safe_redirect_target("https://app.example.com/", ()) is None


@pytest.mark.parametrize(
    "entry",
    [
        "APP.example.com",
        "app.example.com.",
        "*.example.com",
        "app.example.com:443",
        "bücher.example",
        "",
        "a..b",
    ],
)
def test_allow_list_entries_must_be_canonical(entry: str) -> None:
    with pytest.raises(ValueError, match="allowed redirect host"):
        check_allowed_hosts([entry])


def _lands_on_allowed_host(target: str) -> bool:
    resolved = urlsplit(urljoin(BASE, target))
    return (
        resolved.scheme == "https" and "@" not in resolved.netloc and resolved.hostname in ALLOWED
    )


# Characters and fragments that URL confusion attacks are made of.
_PIECES = st.sampled_from(
    [
        "/",
        "//",
        "\\",
        "@",
        ":",
        "?",
        "#",
        ".",
        "%",
        "%2F",
        "%5C",
        "%2f",
        "%25",
        "%0a",
        "%00",
        "%09",
        "%5c",
        "https:",
        "https://",
        "http://",
        "javascript:",
        "app.example.com",
        "evil.example",
        "xn--bcher-kva.example",
        "\t",
        "\n",
        " ",
        "\x00",
        "ü",
        "\u0430",
        "\u3002",  # ideographic full stop, read as "." by some URL parsers
        "\uff0f",  # fullwidth solidus
        "8443",
        "a",
        "Z",
        "%2e",
        "..",
    ]
)
_TARGETS = st.one_of(
    st.lists(_PIECES, max_size=8).map("".join),
    st.text(max_size=40),
    st.builds(
        lambda tail: "https://app.example.com" + tail, st.lists(_PIECES, max_size=6).map("".join)
    ),
    st.builds(lambda tail: "/" + tail, st.lists(_PIECES, max_size=6).map("".join)),
)


@settings(max_examples=600, deadline=None)
@given(_TARGETS)
def test_nothing_accepted_leaves_the_allow_list(target: str) -> None:
    accepted = safe_redirect_target(target, ALLOWED)
    if accepted is None:
        return
    assert accepted == target
    assert _lands_on_allowed_host(target)
    # Also after one more decoding, as a careless component behind us might do.
    assert _lands_on_allowed_host(unquote(target))


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=6).map("".join))
def test_acceptance_does_not_depend_on_the_base_host(tail: str) -> None:
    # A local path is accepted or not on its own merits; it always stays on the base host.
    target = "/" + tail
    if safe_redirect_target(target, ALLOWED) is not None:
        for base in ("https://app.example.com/", "https://other.example/a/b"):
            assert urlsplit(urljoin(base, target)).netloc == urlsplit(base).netloc


_PATH_CHARS = st.sampled_from("abcxyz0129-._~!$&'()*+,;=:@/?#")
_ESCAPES = st.sampled_from(["%41", "%7E", "%C3%A9", "%3F", "%23"])


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet="abcxyz0129-._~", min_size=1, max_size=5),
    st.lists(_PATH_CHARS | _ESCAPES, max_size=20).map("".join),
)
def test_ordinary_local_paths_are_accepted(first: str, rest: str) -> None:
    # The guard must not refuse the paths applications actually use.
    path = f"/{first}{rest}"
    assert safe_redirect_target(path, ()) == path
