"""Strict request-target normalization: the one place a request path is interpreted.

`normalize_path` turns the raw request target into the decoded path that route matching
and policies see, and the exact path the upstream receives. It promises:

- the upstream path is the canonical percent-encoding of the matched path, so decoding it
  once gives back exactly what the policy saw, and normalizing it again changes nothing;
- the matched path never contains an empty segment (``//``), a dot-segment, NUL, a
  backslash (unless encoded separators are allowed) or a control character, and never
  climbs above the root;
- anything a common server could read in more than one way is refused with a 400
  (`PathRejected`) instead of being guessed at: encoded slashes and backslashes, ``;``
  path parameters, ``#``, malformed escapes, invalid or overlong UTF-8, absolute-form
  targets, characters that Unicode compatibility folding turns into ``/``, ``\\`` or dots.

Decisions: the query string is split off at the first ``?`` and passed through untouched
(it is validated, never decoded and never used to match a path rule); a trailing slash is
kept (``/a/`` and ``/a`` are different paths to most upstreams, so they stay different to
the policy); letter case is kept (routes that want case-insensitive literals use
`fold_case`). Encoded slashes and ``;`` are refused unless the caller's `PathOptions`
allow them; the route table allows them only for routes that opt in.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import msgspec

__all__ = [
    "STRICT",
    "NormalizedPath",
    "PathOptions",
    "PathRejected",
    "fold_case",
    "normalize_path",
]

DEFAULT_MAX_LENGTH = 8 * 1024
DEFAULT_MAX_SEGMENTS = 128

_HEX = b"0123456789abcdefABCDEF"
# RFC 3986 pchar without pct-encoded: unreserved / sub-delims / ":" / "@". Every other
# character is percent-encoded on the way upstream; these are sent as they are.
_PCHAR_SAFE = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@"
)
# Characters a compatibility-folding server would read as syntax (fullwidth "/" etc.).
_NFKC_FORBIDDEN = ("/", "\\", "?", "#", "%")
# Paths made only of these bytes need no decoding and no re-encoding (";" excluded: it is
# refused unless allowed, which the general path decides).
_ALREADY_CANONICAL = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
_ENCODE_TABLE: tuple[str, ...] = tuple(
    chr(b) if b in _PCHAR_SAFE else f"%{b:02X}" for b in range(256)
)


class PathRejected(ValueError):
    """The request target is refused; the client gets `status` with `reason`.

    `code` is a short stable token for metrics and audit (``encoded_slash``, ``dot_segment``...).
    """

    def __init__(self, reason: str, *, code: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.status = status
        # A rejected target never becomes valid by retrying it unchanged.
        self.retriable = False


@dataclass(frozen=True, slots=True)
class PathOptions:
    """What `normalize_path` accepts beyond the strict default."""

    # Longest accepted path, in bytes, both as received and as re-encoded for upstream.
    max_length: int = DEFAULT_MAX_LENGTH
    # Most "/"-separated segments accepted in the received path (dot and empty ones count).
    max_segments: int = DEFAULT_MAX_SEGMENTS
    # Accept %2F and %5C inside a segment (object keys); the segment keeps the decoded
    # character and the upstream receives it encoded again. The pieces between them must
    # still be non-empty and not "." or "..", for upstreams that decode before normalizing.
    allow_encoded_slash: bool = False
    # Accept ";" (raw or %3B) inside a segment as an ordinary character.
    allow_path_params: bool = False
    # Accept the asterisk-form target "*" (only meaningful for OPTIONS).
    allow_asterisk: bool = False


STRICT = PathOptions()


class NormalizedPath(msgspec.Struct, frozen=True):
    """A request target after normalization.

    `segments` are the decoded segments between slashes; a trailing slash shows as a final
    empty segment and the root path is ``("",)``. `path` is ``"/" + "/".join(segments)``.
    Match on `segments` when encoded slashes are allowed: then a segment may contain "/".
    """

    path: str
    segments: tuple[str, ...]
    upstream_path: str
    # Everything after the first "?", untouched; None when the target had no "?".
    query: str | None
    has_encoded_slash: bool = False
    has_path_params: bool = False
    is_asterisk: bool = False

    @property
    def upstream_target(self) -> str:
        """The request target to send upstream: canonical path plus the original query."""
        if self.query is None:
            return self.upstream_path
        return f"{self.upstream_path}?{self.query}"


def fold_case(text: str) -> str:
    """Case-fold for case-insensitive route literals (Unicode full case folding)."""
    return text.casefold()


def normalize_path(raw_target: bytes | str, options: PathOptions = STRICT) -> NormalizedPath:
    """Normalize a raw HTTP request target, or raise `PathRejected`.

    The status is 400, or 414 for a path longer than `PathOptions.max_length`.
    """
    target = _as_bytes(raw_target)
    if target == b"*":
        if options.allow_asterisk:
            return NormalizedPath(
                path="*", segments=(), upstream_path="*", query=None, is_asterisk=True
            )
        raise PathRejected("asterisk-form request target is not allowed", code="asterisk_form")
    if not target.startswith(b"/"):
        # Absolute-form (http://host/x) and authority-form (host:443) would let the client
        # name a different host or path than the one the policy reads.
        raise PathRejected("request target must be a path starting with '/'", code="not_origin")
    if b" " in target:
        # A request line cannot carry one; a target holding one came from somewhere else.
        raise PathRejected("raw space in request target", code="whitespace")
    if b"#" in target:
        raise PathRejected("'#' is not allowed in a request target", code="fragment")
    raw_path, sep, raw_query = target.partition(b"?")
    query = _check_query(raw_query) if sep else None

    if len(raw_path) > options.max_length:
        raise PathRejected(
            f"path longer than {options.max_length} bytes", code="too_long", status=414
        )
    raw_segments = raw_path[1:].split(b"/")
    if len(raw_segments) > options.max_segments:
        raise PathRejected(
            f"path has more than {options.max_segments} segments", code="too_many_segments"
        )
    if _ALREADY_CANONICAL.fullmatch(raw_path) and b"//" not in raw_path and b"/." not in raw_path:
        # The common case: nothing to decode, no dot-segments, no empty segments. The
        # general path below gives the same result, only slower.
        path = raw_path.decode("ascii")
        return NormalizedPath(
            path=path, segments=tuple(path[1:].split("/")), upstream_path=path, query=query
        )
    return _normalize_segments(raw_segments, query, options)


def _normalize_segments(
    raw_segments: list[bytes], query: str | None, options: PathOptions
) -> NormalizedPath:
    """Decode, check and resolve the segments of any path (the general case)."""
    segments: list[str] = []
    ends_with_slash = False
    for raw_segment in raw_segments:
        segment = _decode_segment(raw_segment)
        if segment in ("", "."):
            ends_with_slash = True
            continue
        if segment == "..":
            if not segments:
                raise PathRejected("path climbs above the root", code="dot_segment")
            segments.pop()
            ends_with_slash = True
            continue
        ends_with_slash = False
        if "/" in segment or "\\" in segment:
            if not options.allow_encoded_slash:
                raise PathRejected(
                    "encoded '/' or '\\' (%2F, %5C) is not allowed in a path",
                    code="encoded_slash",
                )
            _check_encoded_slash_segment(segment)
        if ";" in segment and not options.allow_path_params:
            raise PathRejected("';' path parameters are not allowed in a path", code="path_params")
        segments.append(segment)
    if ends_with_slash or not segments:
        segments.append("")

    upstream_path = "/" + "/".join(_encode_segment(s) for s in segments)
    if len(upstream_path) > options.max_length:
        raise PathRejected(
            f"path longer than {options.max_length} bytes once encoded",
            code="too_long",
            status=414,
        )
    return NormalizedPath(
        path="/" + "/".join(segments),
        segments=tuple(segments),
        upstream_path=upstream_path,
        query=query,
        # From the segments that survived: "/a%2Fb/.." has no encoded slash left.
        has_encoded_slash=any("/" in s or "\\" in s for s in segments),
        has_path_params=any(";" in s for s in segments),
    )


def _as_bytes(raw_target: bytes | str) -> bytes:
    if isinstance(raw_target, bytes):
        return raw_target
    try:
        # Servers that hand over the target as text decoded it from UTF-8; lone surrogates
        # (from surrogateescape) mean the bytes were not UTF-8.
        return raw_target.encode("utf-8")
    except UnicodeEncodeError:
        raise PathRejected("request target is not valid UTF-8", code="invalid_utf8") from None


def _check_query(raw_query: bytes) -> str:
    try:
        query = raw_query.decode("utf-8")
    except UnicodeDecodeError:
        raise PathRejected("query string is not valid UTF-8", code="invalid_utf8") from None
    if not (query.isascii() and query.isprintable()) and any(_is_control(c) for c in query):
        raise PathRejected("control character in query string", code="control_char")
    return query


def folds_ambiguously(text: str, *, whole_segment: bool = True) -> bool:
    """Whether compatibility folding (NFKC), which some servers apply to paths, changes
    what `text` means: "\uff0e\uff0e" becomes "..", "\uff0f" becomes "/" there. With
    `whole_segment` False, `text` is only part of a segment, and folding to dots is fine."""
    folded = unicodedata.normalize("NFKC", text)
    return (whole_segment and folded in (".", "..")) or any(c in folded for c in _NFKC_FORBIDDEN)


def _decode_segment(raw_segment: bytes) -> str:
    """Percent-decode one raw segment exactly once and check what it decodes to."""
    if b"\\" in raw_segment:
        raise PathRejected("'\\' is not allowed in a path", code="backslash")
    if b"%" in raw_segment:
        raw_segment = _percent_decode(raw_segment)
    try:
        segment = raw_segment.decode("utf-8")
    except UnicodeDecodeError:
        # Python's strict decoder also refuses overlong forms (%C0%AE) and surrogates.
        raise PathRejected("path is not valid UTF-8", code="invalid_utf8") from None
    if segment.isascii():
        if not segment.isprintable():
            raise PathRejected("NUL or control character in path", code="control_char")
        if "#" in segment:
            raise PathRejected("'%23' ('#') is not allowed in a path", code="fragment")
        return segment
    if any(_is_control(c) for c in segment):
        raise PathRejected("NUL or control character in path", code="control_char")
    if "#" in segment:
        raise PathRejected("'%23' ('#') is not allowed in a path", code="fragment")
    if folds_ambiguously(segment):
        raise PathRejected(
            "path segment contains characters that fold to '/', '\\', '?', '#', '%' or dots",
            code="ambiguous_unicode",
        )
    return segment


def _percent_decode(raw: bytes) -> bytes:
    out = bytearray()
    i = 0
    length = len(raw)
    while i < length:
        byte = raw[i]
        if byte != 0x25:  # "%"
            out.append(byte)
            i += 1
            continue
        escape = raw[i + 1 : i + 3]
        if len(escape) != 2 or escape[0] not in _HEX or escape[1] not in _HEX:
            raise PathRejected("malformed percent-escape in path", code="bad_escape")
        out.append(int(escape, 16))
        i += 3
    return bytes(out)


def _check_encoded_slash_segment(segment: str) -> None:
    # An upstream that decodes %2F and then normalizes would see these pieces as
    # dot-segments or empty segments: it would climb out of the directory the policy
    # matched, or collapse "%2F%2Fadmin" into "/admin".
    for piece in segment.replace("\\", "/").split("/"):
        if piece in ("", ".", ".."):
            raise PathRejected(
                "empty or dot-segment hidden behind an encoded '/' or '\\'",
                code="dot_segment",
            )


def _encode_segment(segment: str) -> str:
    if segment.isascii() and segment.isalnum():
        return segment
    return "".join([_ENCODE_TABLE[b] for b in segment.encode("utf-8")])


def _is_control(char: str) -> bool:
    # Cc covers C0, DEL and C1; line and paragraph separators split log lines too.
    return unicodedata.category(char) in ("Cc", "Zl", "Zp")
