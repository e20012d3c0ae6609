"""Path normalization: bypass attempts, canonical upstream form, and its security properties."""

from __future__ import annotations

import posixpath
import re
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.authz.paths import (
    STRICT,
    NormalizedPath,
    PathOptions,
    PathRejected,
    _normalize_segments,
    fold_case,
    normalize_path,
)


def rejected(target: bytes | str, options: PathOptions = STRICT) -> PathRejected:
    with pytest.raises(PathRejected) as caught:
        normalize_path(target, options)
    return caught.value


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/", "/"),
        ("/public/../admin", "/admin"),
        ("/public/%2e%2e/admin", "/admin"),
        ("/public/%2E%2e/admin", "/admin"),
        ("/public/.%2e/admin", "/admin"),
        ("/./admin", "/admin"),
        ("/admin/./", "/admin/"),
        ("//admin", "/admin"),
        ("///admin//x", "/admin/x"),
        ("/admin/", "/admin/"),
        ("/admin/.", "/admin/"),
        ("/admin/x/..", "/admin/"),
        ("/a/..", "/"),
        ("/ADMIN", "/ADMIN"),
        ("/%61dmin", "/admin"),
        ("/caf%c3%a9", "/café"),
        ("/café", "/café"),
        ("/%252e%252e/admin", "/%2e%2e/admin"),
        ("/a%20b", "/a b"),
        ("/...", "/..."),
    ],
)
def test_normalized_paths(target: str, path: str) -> None:
    assert normalize_path(target).path == path


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("/%2e%2e/admin", "dot_segment"),
        ("/../admin", "dot_segment"),
        ("/public/../../admin", "dot_segment"),
        ("/%2fadmin", "encoded_slash"),
        ("/public%2F..%2Fadmin", "encoded_slash"),
        ("/%5cadmin", "encoded_slash"),
        ("/\\admin", "backslash"),
        ("/public\\..\\admin", "backslash"),
        ("/admin;x", "path_params"),
        ("/admin%3bx", "path_params"),
        ("/admin%00", "control_char"),
        (b"/admin\x00", "control_char"),
        ("/admin%0a", "control_char"),
        ("/admin%0d%0aX-Injected:1", "control_char"),
        ("/admin%7f", "control_char"),
        ("/admin%c2%85", "control_char"),
        ("/admin%e2%80%a8", "control_char"),
        ("/admin x", "whitespace"),
        ("/admin?x y", "whitespace"),
        ("/admin#x", "fragment"),
        ("/admin?x#y", "fragment"),
        ("/admin%23x", "fragment"),
        ("/%c0%ae%c0%ae/admin", "invalid_utf8"),
        ("/%c0%af", "invalid_utf8"),
        ("/%e0%80%ae", "invalid_utf8"),
        ("/%ed%a0%80", "invalid_utf8"),
        ("/%ff", "invalid_utf8"),
        (b"/\xc0\xae", "invalid_utf8"),
        ("/\udcff", "invalid_utf8"),
        ("/%ef%bc%8e%ef%bc%8e/admin", "ambiguous_unicode"),
        ("/public/\uff0e\uff0e/admin", "ambiguous_unicode"),
        ("/public\uff0fadmin", "ambiguous_unicode"),
        ("/%zz", "bad_escape"),
        ("/%4", "bad_escape"),
        ("/a%", "bad_escape"),
        ("/%u002e%u002e/admin", "bad_escape"),
        ("http://host/admin", "not_origin"),
        ("host:443", "not_origin"),
        ("admin", "not_origin"),
        ("", "not_origin"),
        ("*", "asterisk_form"),
    ],
)
def test_bypass_attempts_are_rejected(target: bytes | str, code: str) -> None:
    error = rejected(target)
    assert error.code == code
    assert error.status == 400
    assert str(error) == error.reason


def test_upstream_receives_canonical_encoding_of_what_policy_saw() -> None:
    result = normalize_path("/caf%c3%a9/%41%7e/a%20b/x%2525/%2525/y%5B1%5d")
    assert result.path == "/café/A~/a b/x%25/%25/y[1]"
    assert result.upstream_path == "/caf%C3%A9/A~/a%20b/x%2525/%2525/y%5B1%5D"
    assert result.segments == ("café", "A~", "a b", "x%25", "%25", "y[1]")


def test_query_is_split_at_first_question_mark_and_kept_untouched() -> None:
    result = normalize_path("/public/../admin?next=/public&x=%zz?y")
    assert result.path == "/admin"
    assert result.query == "next=/public&x=%zz?y"
    assert result.upstream_target == "/admin?next=/public&x=%zz?y"
    assert normalize_path("/a?").query == ""
    assert normalize_path("/a").query is None
    assert normalize_path("/a").upstream_target == "/a"


def test_query_with_control_characters_or_bad_utf8_is_rejected() -> None:
    assert rejected(b"/a?x=\x00").code == "control_char"
    assert rejected(b"/a?x=\xff").code == "invalid_utf8"


def test_bytes_and_text_targets_agree() -> None:
    assert normalize_path(b"/caf\xc3\xa9/x?q=1") == normalize_path("/café/x?q=1")


def test_length_and_segment_limits() -> None:
    options = PathOptions(max_length=64, max_segments=4)
    assert normalize_path("/" + "a" * 63, options).path == "/" + "a" * 63
    too_long = rejected("/" + "a" * 64, options)
    assert (too_long.code, too_long.status) == ("too_long", 414)
    # Re-encoding may grow a path past the limit; it must not slip through then.
    assert rejected("/" + "é" * 30, options).code == "too_long"
    assert normalize_path("/a/b/c/d", options).path == "/a/b/c/d"
    assert rejected("/a/b/c/d/e", options).code == "too_many_segments"
    assert rejected("/" + "/" * 10, options).code == "too_many_segments"
    assert rejected("/" + "a" * 10_000_000).code == "too_long"


def test_encoded_slash_opt_in_keeps_the_segment_whole() -> None:
    options = PathOptions(allow_encoded_slash=True)
    result = normalize_path("/objects/a%2Fb%5Cc", options)
    assert result.segments == ("objects", "a/b\\c")
    assert result.upstream_path == "/objects/a%2Fb%5Cc"
    assert result.has_encoded_slash
    # Still no climbing out through an upstream that decodes and then normalizes.
    assert rejected("/objects/x%2F..%2F..%2Fadmin", options).code == "dot_segment"
    assert rejected("/objects/..%5Cadmin", options).code == "dot_segment"
    # Nor a slash that a decoding upstream would collapse: %2Fadmin is /admin there.
    assert rejected("/%2Fadmin", options).code == "dot_segment"
    assert rejected("/objects/a%2F%2Fb", options).code == "dot_segment"
    assert not normalize_path("/objects/a%2Fb/..", options).has_encoded_slash
    assert rejected("/a\\b", options).code == "backslash"


def test_path_params_opt_in() -> None:
    result = normalize_path("/cars;color=red/x%3By", PathOptions(allow_path_params=True))
    assert result.segments == ("cars;color=red", "x;y")
    assert result.upstream_path == "/cars;color=red/x;y"
    assert result.has_path_params


def test_asterisk_form_opt_in() -> None:
    result = normalize_path("*", PathOptions(allow_asterisk=True))
    assert result.is_asterisk
    assert result.upstream_target == "*"


def test_fold_case_helper() -> None:
    assert fold_case("/ADMIN/Straße") == "/admin/strasse"


# -- properties ------------------------------------------------------------------------------

_TOKENS = [
    "/", "//", ".", "..", "%", "2e", "2E", "2f", "5c", "%2e", "%2E", "%2f", "%2F", "%5c",
    "%5C", "\\", ";", "%3b", "%00", "%c0%ae", "%c0%af", "%e0%80%ae", "%25", "%252e", "?",
    "#", "%23", "%41", "%7e", "%20", "admin", "ADMIN", "public", "a", "x", "é", "%c3%a9",
    "\uff0e", "%ef%bc%8f", "\u212a", "~", "-", "%zz", "%4",
]  # fmt: skip

_character_soup = st.lists(
    st.one_of(
        st.sampled_from(_TOKENS),
        st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=3),
    ),
    max_size=12,
).map(lambda parts: "/" + "".join(parts))
# Whole segments, so that generated paths often land on or near /admin.
_SEGMENTS = [
    "admin", "public", "", ".", "..", "%2e", "%2e%2e", ".%2E", "%2e.", "admin%2f", "%2fadmin",
    "admin;x", "ADMIN", "admin%00", "admin%23", "x", "%61dmin", "adm%69n", "\\admin",
    "%c0%ae%c0%ae", "admin.", "admin%20", "?admin", "..%2f",
]  # fmt: skip
_segment_paths = st.lists(st.sampled_from(_SEGMENTS), min_size=1, max_size=8).map(
    lambda segments: "/" + "/".join(segments)
)
_paths = st.one_of(_character_soup, _segment_paths)


def _normalized_or_none(target: str, options: PathOptions = STRICT) -> NormalizedPath | None:
    try:
        return normalize_path(target, options)
    except PathRejected:
        return None


def _inside_admin(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


_property = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_property
@given(_paths)
def test_normalization_is_idempotent(target: str) -> None:
    result = _normalized_or_none(target)
    if result is None:
        return
    again = normalize_path(result.upstream_target)
    assert again == result


@_property
@given(_paths)
def test_normalized_path_has_no_ambiguous_forms(target: str) -> None:
    result = _normalized_or_none(target)
    if result is None:
        return
    path = result.path
    assert path.startswith("/")
    assert path == "/" + "/".join(result.segments)
    for bad in ("//", "/./", "/../", "\x00", "\\", "#"):
        assert bad not in path
    assert not path.endswith(("/.", "/.."))
    assert all(ch.isprintable() or ch == " " for ch in path if ch.isascii())
    assert result.upstream_path.isascii()
    assert " " not in result.upstream_target


@_property
@given(_paths)
def test_decoding_upstream_path_gives_exactly_the_matched_path(target: str) -> None:
    result = _normalized_or_none(target)
    if result is None:
        return
    assert unquote(result.upstream_path, errors="strict") == result.path


@_property
@given(_paths)
def test_policy_and_upstream_agree_on_admin_prefix(target: str) -> None:
    result = _normalized_or_none(target)
    if result is None:
        return
    # How a typical upstream reads what it receives: decode once, then normalize.
    upstream_view = posixpath.normpath(unquote(result.upstream_path))
    assert _inside_admin(result.path) == _inside_admin(upstream_view)
    # And how a naive upstream would have read the raw target had it been sent unchanged.
    raw_path = target.partition("?")[0]
    naive_view = re.sub("^/+", "/", posixpath.normpath(unquote(raw_path)))
    assert _inside_admin(result.path) == _inside_admin(naive_view)


_plain_paths = st.lists(
    st.text(st.sampled_from("aZ09-._~!$&'()*+,=:@/"), max_size=6), min_size=1, max_size=6
).map(lambda parts: "/" + "/".join(parts))


@_property
@given(_plain_paths)
def test_fast_path_for_plain_targets_agrees_with_the_general_one(target: str) -> None:
    result = _normalized_or_none(target)
    try:
        general = _normalize_segments(target.encode()[1:].split(b"/"), None, STRICT)
    except PathRejected:
        assert result is None
        return
    assert result == general


_PERMISSIVE = PathOptions(allow_encoded_slash=True, allow_path_params=True)


@_property
@given(_paths)
def test_opt_ins_keep_idempotence_and_exact_decoding(target: str) -> None:
    result = _normalized_or_none(target, _PERMISSIVE)
    if result is None:
        return
    assert normalize_path(result.upstream_target, _PERMISSIVE) == result
    assert unquote(result.upstream_path, errors="strict") == result.path
    # An encoded slash never hides a dot-segment from an upstream that decodes first.
    upstream_view = posixpath.normpath(unquote(result.upstream_path))
    assert _inside_admin(result.path) == _inside_admin(re.sub("^/+", "/", upstream_view))
