"""Hostile and broken requests get a clean 4xx, never reach the upstream ambiguously, and
the proxy keeps serving. Each case runs against both of aiohttp's HTTP parsers."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lineage_sidecar.ports import free_port
from tests.integration.proxy.conftest import RunningProxy, run_proxy
from tests.integration.proxy.rawhttp import exchange, get, read_reply


def upstream_log(proxy: RunningProxy) -> list[dict[str, Any]]:
    reply = get(proxy.port, "/__log")
    assert reply.status == 200
    entries: list[dict[str, Any]] = reply.json()
    return entries


BAD_REQUESTS: dict[str, tuple[bytes, set[int]]] = {
    "cl-te": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nG",
        {400},
    ),
    "te-cl": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        b"8\r\nSMUGGLED\r\n0\r\n\r\n",
        {400},
    ),
    "te-te-second-value": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: cow\r\n"
        b"\r\n0\r\n\r\n",
        {400, 501},
    ),
    "te-xchunked": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        {400, 501},
    ),
    "te-space-before-colon": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        {400},
    ),
    "te-list": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        {400, 501},
    ),
    "two-content-lengths": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        {400},
    ),
    "signed-content-length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
        {400},
    ),
    "bad-chunk-size": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        {400},
    ),
    "http10-with-transfer-encoding": (
        b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        {400},
    ),
    "no-version": (b"GET /\r\n\r\n", {400, 505}),
    "unknown-version": (b"GET / HTTP/9.9\r\nHost: a\r\n\r\n", {400, 505}),
    "bad-method-token": (b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    "space-in-target": (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    "absolute-form": (b"GET http://evil.test/admin HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    "authority-form": (b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n", {400}),
    "host-with-userinfo": (b"GET / HTTP/1.1\r\nHost: good@evil\r\n\r\n", {400}),
    "two-hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", {400}),
    "missing-host": (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", {400}),
    "nul-in-header": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n", {400}),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n", {400}),
    "header-too-large": (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 20000 + b"\r\n\r\n",
        {431},
    ),
    "too-many-headers": (
        b"GET / HTTP/1.1\r\nHost: a\r\n"
        + b"".join(b"X-%d: v\r\n" % i for i in range(80))
        + b"\r\n",
        {431},
    ),
    "body-too-large": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000000\r\n\r\nabc",
        {413},
    ),
    "non-ascii-target": (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_refused_and_never_forwarded(plain_proxy: RunningProxy, case: str) -> None:
    raw, statuses = BAD_REQUESTS[case]
    seen_before = len(upstream_log(plain_proxy))
    reply = exchange(plain_proxy.port, raw)
    assert reply.status in statuses, (reply.status, reply.body)
    if reply.body:
        answer = json.loads(reply.body)
        assert "error" in answer
        # One line saying what is wrong, never llhttp's copy of the bytes with a caret.
        assert "\n" not in answer["message"]
        assert answer["message"].strip()
    # Nothing reached the upstream: not the request, not a smuggled second one.
    assert len(upstream_log(plain_proxy)) == seen_before
    assert get(plain_proxy.port, "/still-serving").status == 200


TARGETS_NOT_A_PATH = {
    "asterisk": b"GET * HTTP/1.1",
    "asterisk-options": b"OPTIONS * HTTP/1.1",
    "bare-word": b"GET a HTTP/1.1",
    "absolute-form": b"GET http://evil.test/admin HTTP/1.1",
    "authority-form": b"CONNECT evil.test:443 HTTP/1.1",
}


@pytest.mark.parametrize("case", sorted(TARGETS_NOT_A_PATH))
def test_a_target_that_is_not_a_path_is_refused_saying_so(
    plain_proxy: RunningProxy, case: str
) -> None:
    # Whichever parser or stage refuses it, the client reads the same reason (aiohttp's own
    # message for `GET *` was just "*").
    reply = exchange(plain_proxy.port, TARGETS_NOT_A_PATH[case] + b"\r\nHost: a\r\n\r\n")
    assert reply.status == 400
    answer = reply.json()
    assert answer["error"] == "bad_request_target"
    assert answer["message"] == "only origin-form request targets (/path) are accepted"


def test_client_gone_mid_body_never_returns_a_half_written_connection(
    plain_proxy: RunningProxy,
) -> None:
    upstream_log(plain_proxy)
    with socket.create_connection(("127.0.0.1", plain_proxy.port)) as sock:
        sock.sendall(
            b"POST /cut HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000
        )
        time.sleep(0.3)
    # Were the upstream connection reused, these requests' bytes would be read as the rest
    # of the cut body: each must come back as its own request instead.
    for index in range(5):
        reply = get(plain_proxy.port, f"/after-cut/{index}")
        assert reply.status == 200
        assert reply.json()["target"] == f"/after-cut/{index}"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        cut = [e for e in upstream_log(plain_proxy) if e.get("target") == "/cut"]
        if cut:
            break
        time.sleep(0.1)
    assert cut, "the upstream never saw the cut request end"
    assert cut[-1]["complete"] is False
    assert cut[-1]["body_length"] < 100000


def test_upstream_closing_mid_response_gives_502(plain_proxy: RunningProxy) -> None:
    reply = get(plain_proxy.port, "/__close_mid_body")
    assert reply.status == 502
    assert reply.json()["error"] == "upstream_closed"
    assert get(plain_proxy.port, "/still-serving").status == 200


def test_a_second_response_in_one_exchange_is_never_passed_on(plain_proxy: RunningProxy) -> None:
    # An upstream out of step sends two responses for one request. The client gets the
    # first, whole and alone; the second (a redirect setting a cookie) reaches no one, and
    # that upstream connection is not used again. Operators see it counted.
    before = protocol_errors(plain_proxy)
    with socket.create_connection(("127.0.0.1", plain_proxy.port)) as sock:
        sock.settimeout(15)
        sock.sendall(b"GET /__two_answers HTTP/1.1\r\nHost: a\r\n\r\n")
        first = read_reply(sock)
        sock.sendall(b"GET /after-two-answers HTTP/1.1\r\nHost: a\r\n\r\n")
        second = read_reply(sock)
    assert (first.status, first.body) == (200, b"ok")
    assert first.header("Location") is None
    assert first.header_all("Set-Cookie") == []
    assert second.status == 200
    assert second.json()["target"] == "/after-two-answers"
    [split] = [e for e in upstream_log(plain_proxy) if e.get("target") == "/__two_answers"][-1:]
    assert second.json()["connection"] != split["connection"]
    assert protocol_errors(plain_proxy) == before + 1


def protocol_errors(proxy: RunningProxy) -> float:
    exposition = get(proxy.admin_port, "/metrics").body.decode()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if (
                sample.name == "lineage_sidecar_upstream_errors_total"
                and sample.labels.get("kind") == "protocol"
            ):
                return sample.value
    return 0.0


def test_upstream_closing_without_answer_gives_502(plain_proxy: RunningProxy) -> None:
    reply = get(plain_proxy.port, "/__close_early")
    assert reply.status == 502
    assert get(plain_proxy.port, "/still-serving").status == 200


def test_slow_upstream_gives_504(plain_proxy: RunningProxy) -> None:
    reply = get(plain_proxy.port, "/__slow?ms=3000")
    assert reply.status == 504
    assert reply.json()["error"] == "upstream_timeout"
    assert get(plain_proxy.port, "/still-serving").status == 200


def test_upstream_down_gives_502_and_readyz_says_why(tmp_path: Path) -> None:
    closed = free_port()
    with run_proxy(tmp_path, f"http://127.0.0.1:{closed}", wait_ready=False) as proxy:
        reply = get(proxy.port, "/anything")
        assert reply.status == 502
        assert reply.json()["error"] == "upstream_connect"
        ready = get(proxy.admin_port, "/readyz")
        assert ready.status == 503
        detail = ready.json()
        assert detail["ready"] is False
        assert f"127.0.0.1:{closed} unreachable" in detail["reasons"][0]
