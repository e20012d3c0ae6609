"""Where a browser may be sent after login: only a path on this site.

`local_return_path()` is the open-redirect guard for `/saml/login?return_to=...`. It accepts
a value only when every browser would resolve it against the current origin: it starts with
one `/`, and contains no second leading `/` or `\\`, no backslash at all (browsers read `\\`
as `/`), no scheme or authority, and no whitespace or control characters (browsers strip
tab and newline from URLs, so `/\\t/evil` would become `//evil`). Anything else is refused,
never repaired.
"""

from __future__ import annotations

from urllib.parse import urlsplit

MAX_RETURN_TO_CHARS = 2048
DEFAULT_RETURN_TO = "/"


class UnsafeReturnTo(ValueError):
    """The return_to value could lead off this site."""


def local_return_path(value: str | None) -> str:
    """The path to send the browser to after login, or `UnsafeReturnTo`.

    An absent or empty value means the site root.
    """
    if value is None or value == "":
        return DEFAULT_RETURN_TO
    if len(value) > MAX_RETURN_TO_CHARS:
        raise UnsafeReturnTo("return_to is too long")
    if not value.isascii() or any(ch <= " " or ch == "\x7f" for ch in value):
        raise UnsafeReturnTo("return_to may hold only printable ASCII (percent-encode the rest)")
    if "\\" in value:
        raise UnsafeReturnTo("return_to must not contain a backslash")
    if not value.startswith("/") or value.startswith("//"):
        raise UnsafeReturnTo("return_to must be a path starting with a single /")
    parts = urlsplit(value)
    # Belt and braces: after the checks above a scheme or authority cannot parse out.
    if parts.scheme or parts.netloc:
        raise UnsafeReturnTo("return_to must not name a scheme or host")
    return value
