"""Return-to targets: where a browser may be sent after sign-in or sign-out.

`safe_redirect_target()` is a pure function. It accepts only
- a local path (`/x`, `/x?y#z`) whose second character is not `/`, or
- an absolute `https://host[:port]/...` URL whose host is exactly on the allow-list,
and refuses everything a browser could read differently from `urllib`: backslashes,
whitespace and control characters anywhere (browsers strip tabs and newlines, and treat
`\\` as `/`), non-ASCII (IDN hosts must be allow-listed in their punycode form and given
that way), userinfo (`https://good@evil`), scheme-relative `//evil`, `https:evil`, other
schemes (`javascript:`), and percent-escapes in the path that decode to `/`, `\\`, `%`
or a control character (`/%2F%2Fevil` turns into `//evil` in any component that decodes
once more before redirecting). The promise, tested with hypothesis: nothing it accepts
resolves, against the configured base URL, to a host outside the allow-list.
"""

from __future__ import annotations

import re
from collections.abc import Collection

MAX_TARGET_CHARS = 2048

# Printable ASCII without space and backslash; everything else is refused outright.
_PRINTABLE = re.compile(r"[\x21-\x5b\x5d-\x7e]*")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# Escapes that must not appear in the path, however the target is decoded later.
_PATH_FORBIDDEN_BYTES = frozenset({0x2F, 0x5C, 0x25, 0x7F, *range(0x21)})
_ANY_FORBIDDEN_BYTES = frozenset({0x5C, 0x7F, *range(0x21)})
_HOST = re.compile(r"(?P<host>[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?)(?::(?P<port>[0-9]{1,5}))?")
# An allow-list entry: a lower-case ASCII DNS name (punycode for IDN) or IPv4 literal.
HOST_ENTRY = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?")


def check_allowed_hosts(hosts: Collection[str]) -> None:
    """Raise ValueError unless every entry is a lower-case ASCII host name (no port,
    no trailing dot, no wildcard); matching is exact, so the entry must be canonical."""
    for host in hosts:
        if not HOST_ENTRY.fullmatch(host) or ".." in host:
            raise ValueError(
                f"allowed redirect host {host!r}: give a lower-case ASCII host name "
                "(punycode for international names), without port or wildcard"
            )


def _escapes_allowed(text: str, forbidden: frozenset[int]) -> bool:
    if text.count("%") != len(_ESCAPE.findall(text)):
        return False  # a bare `%` is not a valid escape: refuse rather than guess
    return all(int(code, 16) not in forbidden for code in _ESCAPE.findall(text))


def _split_path(rest: str) -> tuple[str, str]:
    """Split a path-and-beyond into (path, query-and-fragment)."""
    for index, char in enumerate(rest):
        if char in "?#":
            return rest[:index], rest[index:]
    return rest, ""


def safe_redirect_target(target: str, allowed_hosts: Collection[str]) -> str | None:
    """`target` unchanged when a browser may be sent there, else None."""
    if not target or len(target) > MAX_TARGET_CHARS or not _PRINTABLE.fullmatch(target):
        return None
    if target.startswith("/"):
        if target.startswith("//"):
            return None
        rest = target
    elif target.startswith("https://"):
        authority_and_rest = target[len("https://") :]
        end = len(authority_and_rest)
        for index, char in enumerate(authority_and_rest):
            if char in "/?#":
                end = index
                break
        authority, rest = authority_and_rest[:end], authority_and_rest[end:]
        match = _HOST.fullmatch(authority)
        if match is None or match["host"] not in allowed_hosts or ".." in match["host"]:
            return None
        port = match["port"]
        if port is not None and not 0 < int(port) <= 65535:
            return None
        if rest.startswith("//"):
            return None
    else:
        return None
    path, after = _split_path(rest)
    if not _escapes_allowed(path, _PATH_FORBIDDEN_BYTES):
        return None
    if not _escapes_allowed(after, _ANY_FORBIDDEN_BYTES):
        return None
    return target
