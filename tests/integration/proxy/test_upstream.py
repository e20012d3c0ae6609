"""An upstream that breaks the rules of HTTP/1.1 gets a 502 for the client, never a
response passed on half-checked, and requests are not sent to it twice when they must not
be. Each case runs against both of aiohttp's HTTP parsers (the plain_proxy fixture)."""

from __future__ import annotations

import http.client
import secrets

import pytest

from tests.integration.proxy.conftest import RunningProxy
from tests.integration.proxy.echo_upstream import close_delimited_body
from tests.integration.proxy.rawhttp import exchange, get
from tests.integration.proxy.test_bad_input import upstream_log


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_non_idempotent_request_is_not_resent_after_a_reused_connection_closes(
    plain_proxy: RunningProxy, method: str
) -> None:
    # An answered request leaves a kept-alive connection in the pool for the next one.
    assert get(plain_proxy.port, "/warm").status == 200
    target = f"/__close_early?mark={secrets.token_hex(6)}"
    raw = f"{method} {target} HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n".encode()
    reply = exchange(plain_proxy.port, raw, method=method)
    assert reply.status == 502
    assert reply.json()["error"] == "upstream_closed"
    seen = [entry for entry in upstream_log(plain_proxy) if entry.get("target") == target]
    assert [entry["method"] for entry in seen] == [method]


@pytest.mark.parametrize("size", [0, 300_000])
@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_body_delimited_by_the_upstream_closing_arrives_whole(
    plain_proxy: RunningProxy, version: str, size: int
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", plain_proxy.port, timeout=10)
    try:
        connection.request("GET", f"/__until_close?version={version}&bytes={size}")
        response = connection.getresponse()
        assert response.status == 200
        assert response.read() == close_delimited_body(size)
        # The client's connection stays usable: the body's end was framed for it.
        connection.request("GET", "/after")
        after = connection.getresponse()
        assert after.status == 200
        after.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("count", "size"),
    [
        (101, 10),  # one field more than allowed (with Content-Length)
        (80, 1000),  # few fields, 80 kB of them
        (1, 100 << 20),  # one field of 100 MiB
        (500_000, 200),  # 100 MB of fields
    ],
    ids=["count", "bytes", "one-huge-field", "flood"],
)
def test_oversized_response_head_is_refused_without_holding_it(
    plain_proxy: RunningProxy, count: int, size: int
) -> None:
    peak_before = plain_proxy.rss_peak_kib()
    reply = get(plain_proxy.port, f"/__many_headers?n={count}&size={size}")
    assert reply.status == 502
    assert reply.json()["error"] == "upstream_protocol"
    # Generous: the proxy holds at most the limit and one read, not what was sent.
    assert plain_proxy.rss_peak_kib() - peak_before < 50 << 10
    assert get(plain_proxy.port, "/still-serving").status == 200


def test_response_head_within_the_limits_is_forwarded(plain_proxy: RunningProxy) -> None:
    # 90 fields, 63 kB: near both limits, and within http.client's own 100 fields.
    reply = get(plain_proxy.port, "/__many_headers?n=90&size=700")
    assert reply.status == 200
    assert len(reply.header_all("X-Filler")) == 90
    assert reply.body == b"ok"


def test_unasked_switch_of_protocols_is_refused(plain_proxy: RunningProxy) -> None:
    reply = get(plain_proxy.port, "/__switch")
    assert reply.status == 502
    assert reply.json()["error"] == "upstream_protocol"
    assert get(plain_proxy.port, "/still-serving").status == 200


@pytest.mark.parametrize("code", ["000", "099", "600", "999"])
def test_status_outside_the_http_range_is_refused(plain_proxy: RunningProxy, code: str) -> None:
    reply = get(plain_proxy.port, f"/__status?code={code}")
    assert reply.status == 502
    assert reply.json()["error"] == "upstream_protocol"
    assert get(plain_proxy.port, "/still-serving").status == 200


@pytest.mark.parametrize("code", ["200", "299", "404", "599"])
def test_status_in_the_http_range_is_passed_on(plain_proxy: RunningProxy, code: str) -> None:
    reply = get(plain_proxy.port, f"/__status?code={code}")
    assert reply.status == int(code)
    assert reply.body == b"ok"
