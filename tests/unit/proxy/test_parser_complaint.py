"""aiohttp's parser errors become one line for the client."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.listener import parser_complaint


def test_llhttp_messages_lose_the_copied_bytes_and_caret() -> None:
    message = "Invalid header value char:\n\n  b'X-A: a\\x00b'\n          ^"
    assert parser_complaint(message) == "Invalid header value char"
    status_line = "Bad status line:\n  Invalid method encountered:\n\n  b'G@T / HTTP/1.1'\n   ^"
    assert parser_complaint(status_line) == "Bad status line: Invalid method encountered"


def test_plain_messages_stay_and_empty_ones_get_a_default() -> None:
    assert parser_complaint("Transfer-Encoding can't be present with Content-Length") == (
        "Transfer-Encoding can't be present with Content-Length"
    )
    assert parser_complaint("Bad thing :") == "Bad thing"
    for empty in ("", "   ", "\n\n", ":", " : :", None, b"bytes"):
        assert parser_complaint(empty) == "malformed request"


@given(st.text())
def test_always_one_non_empty_line(message: str) -> None:
    complaint = parser_complaint(message)
    assert complaint
    assert "\n" not in complaint
    assert "\r" not in complaint
    assert complaint == complaint.strip()
