"""The proxy forwards transparently: methods, targets, headers and bodies, both ways."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import zlib
from pathlib import Path

import pytest

from agent.spool import SpoolReader
from tests.integration.proxy.conftest import RunningProxy, run_proxy
from tests.integration.proxy.rawhttp import Reply, exchange, get, read_reply


def echo(proxy: RunningProxy, raw: bytes, method: str = "GET") -> Reply:
    reply = exchange(proxy.port, raw, method=method)
    assert reply.status == 200, reply.body
    return reply


def test_target_query_and_repeated_headers_arrive_unchanged(plain_proxy: RunningProxy) -> None:
    raw = (
        b"GET /db/t%20x.json?x=1&x=2&y=%2F&z= HTTP/1.1\r\nHost: example.test:8443\r\n"
        b"X-Multi: one\r\nX-Multi: two\r\nAccept: */*\r\n\r\n"
    )
    seen = echo(plain_proxy, raw).json()
    assert seen["target"] == "/db/t%20x.json?x=1&x=2&y=%2F&z="
    assert seen["version"] == "1.1"
    multi = [v for k, v in seen["headers"] if k.lower() == "x-multi"]
    assert multi == ["one", "two"]
    hosts = [v for k, v in seen["headers"] if k.lower() == "host"]
    assert hosts == ["example.test:8443"]


def test_hop_by_hop_and_connection_named_headers_are_dropped(plain_proxy: RunningProxy) -> None:
    raw = (
        b"GET /hop HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret-Hop\r\n"
        b"X-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: websocket\r\n"
        b"Proxy-Authorization: Basic eDp5\r\nProxy-Connection: keep-alive\r\nX-Kept: yes\r\n\r\n"
    )
    reply = echo(plain_proxy, raw)
    names = {k.lower() for k, _ in reply.json()["headers"]}
    for dropped in (
        "x-secret-hop", "keep-alive", "te", "upgrade", "proxy-authorization", "proxy-connection",
    ):  # fmt: skip
        assert dropped not in names
    assert "x-kept" in names
    # ...and on the way back: the echo names X-Drop-Me in its Connection header.
    assert reply.header("X-Drop-Me") is None
    assert reply.header("Keep-Alive") is None
    assert reply.header_all("Set-Cookie") == ["a=1", "b=2"]
    assert reply.header("X-Upstream") == "echo"


def test_client_forwarding_headers_are_replaced(plain_proxy: RunningProxy) -> None:
    raw = (
        b"GET /fwd HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: 6.6.6.6\r\n"
        b"X-Forwarded-Host: evil.test\r\nX-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6\r\n"
        b"X-Real-IP: 6.6.6.6\r\nX-Request-Id: forged\r\n\r\n"
    )
    headers = {k.lower(): v for k, v in echo(plain_proxy, raw).json()["headers"]}
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-host"] == "shop.test"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["forwarded"] == 'for=127.0.0.1;proto=http;host="shop.test"'
    assert "x-real-ip" not in headers
    assert headers["x-request-id"] != "forged"
    assert "6.6.6.6" not in str(headers)


def test_forwarding_headers_from_a_trusted_proxy_are_extended(
    echo_upstream: str, tmp_path: Path
) -> None:
    with run_proxy(tmp_path, echo_upstream, proxy={"trusted_proxies": ["127.0.0.0/8"]}) as proxy:
        raw = (
            b"GET /fwd HTTP/1.1\r\nHost: inner\r\nX-Forwarded-For: 203.0.113.7\r\n"
            b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: shop.test\r\n\r\n"
        )
        headers = {k.lower(): v for k, v in echo(proxy, raw).json()["headers"]}
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-host"] == "shop.test"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"])
def test_every_method_is_forwarded_with_its_body(plain_proxy: RunningProxy, method: str) -> None:
    body = f"payload for {method}".encode()
    raw = f"{method} /m HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    seen = echo(plain_proxy, raw).json()
    assert seen["method"] == method
    assert seen["body_length"] == len(body)
    assert seen["sha256_first_mib"] == hashlib.sha256(body).hexdigest()


def test_head_keeps_content_length_and_sends_no_body(plain_proxy: RunningProxy) -> None:
    reply = exchange(
        plain_proxy.port, b"HEAD /__head_len HTTP/1.1\r\nHost: a\r\n\r\n", method="HEAD"
    )
    assert reply.status == 200
    assert reply.header("Content-Length") == "12345"
    assert reply.body == b""
    # The connection used for HEAD is not reused in a confused state:
    assert len(get(plain_proxy.port, "/__head_len").body) == 12345


def test_http10_client_is_forwarded_as_http11(plain_proxy: RunningProxy) -> None:
    seen = echo(plain_proxy, b"GET /old HTTP/1.0\r\nHost: a\r\n\r\n").json()
    assert seen["version"] == "1.1"


def test_chunked_request_body_is_streamed(plain_proxy: RunningProxy) -> None:
    pieces = [b"a" * 10, b"b" * 70000, b"c"]
    body = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    raw = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    seen = echo(plain_proxy, raw).json()
    whole = b"".join(pieces)
    assert seen["body_length"] == len(whole)
    assert seen["sha256_first_mib"] == hashlib.sha256(whole).hexdigest()


def test_chunked_response_is_streamed_back(plain_proxy: RunningProxy) -> None:
    reply = get(plain_proxy.port, "/__chunked?n=300")
    assert reply.status == 200
    assert reply.body == b"c" * 1024 * 300


def test_keep_alive_client_connection_serves_many_requests(plain_proxy: RunningProxy) -> None:
    with socket.create_connection(("127.0.0.1", plain_proxy.port), timeout=10) as sock:
        for index in range(20):
            sock.sendall(f"GET /ka/{index} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            reply = read_reply(sock)
            assert reply.status == 200
            assert reply.json()["target"] == f"/ka/{index}"


GIB = 1 << 30


def _stream_upload(port: int, size: int) -> Reply:
    block = bytes(range(256)) * 1024
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"PUT /big HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n".encode())
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            sock.sendall(piece)
            sent += len(piece)
        return read_reply(sock, "PUT")


def test_one_gib_upload_streams_with_flat_memory(plain_proxy: RunningProxy) -> None:
    before = plain_proxy.rss_peak_kib()
    reply = _stream_upload(plain_proxy.port, GIB)
    assert reply.status == 200
    seen = reply.json()
    assert seen["body_length"] == GIB
    expected = 1
    block = bytes(range(256)) * 1024
    for _ in range(GIB // len(block)):
        expected = zlib.adler32(block, expected)
    assert seen["adler32"] == expected
    growth_mib = (plain_proxy.rss_peak_kib() - before) / 1024
    assert growth_mib < 64, f"proxy peak RSS grew by {growth_mib:.0f} MiB for a 1 GiB upload"


def test_one_gib_download_streams_with_flat_memory(plain_proxy: RunningProxy) -> None:
    before = plain_proxy.rss_peak_kib()
    received = 0
    with socket.create_connection(("127.0.0.1", plain_proxy.port), timeout=60) as sock:
        sock.sendall(f"GET /__big?bytes={GIB} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        reader = sock.makefile("rb")
        status_line = reader.readline()
        assert b" 200 " in status_line
        length = None
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        assert length == GIB
        while received < GIB:
            chunk = reader.read(min(1 << 20, GIB - received))
            assert chunk, "connection closed early"
            received += len(chunk)
    assert received == GIB
    growth_mib = (plain_proxy.rss_peak_kib() - before) / 1024
    assert growth_mib < 64, f"proxy peak RSS grew by {growth_mib:.0f} MiB for a 1 GiB download"


def test_upstream_sees_one_connection_reused(plain_proxy: RunningProxy) -> None:
    connections = {get(plain_proxy.port, f"/reuse/{i}").json()["connection"] for i in range(10)}
    # Sequential requests ride on the pooled keep-alive connection.
    assert len(connections) == 1


def test_concurrent_requests_all_answered(plain_proxy: RunningProxy) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        reply = get(plain_proxy.port, f"/c/{index}")
        with lock:
            results.append(reply.status if reply.json()["target"] == f"/c/{index}" else -1)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [200] * 40


def test_expect_100_continue_is_answered_by_the_proxy(plain_proxy: RunningProxy) -> None:
    with socket.create_connection(("127.0.0.1", plain_proxy.port), timeout=10) as sock:
        sock.sendall(
            b"POST /expect HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = sock.recv(64)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        reply = read_reply(sock, "POST")
    assert reply.status == 200
    seen = reply.json()
    assert seen["body_length"] == 5
    assert "expect" not in {name.lower() for name, _ in seen["headers"]}


def test_bytes_out_is_the_body_the_client_received(echo_upstream: str, tmp_path: Path) -> None:
    # A small body sent whole, a streamed one, an error answer, and a HEAD (no body).
    requests = [
        ("GET", "/__big?bytes=2000"),
        ("GET", "/__chunked?n=100"),
        ("GET", "/__close_early"),
        ("HEAD", "/__head_len"),
    ]
    received: dict[str, int] = {}
    extra = {"capture": {"spool_dir": str(tmp_path / "spool")}}
    with run_proxy(tmp_path, echo_upstream, extra=extra) as proxy:
        for method, target in requests:
            head = f"{method} {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            received[target] = len(exchange(proxy.port, head.encode(), method=method).body)
    assert list(received.values()) == [2000, 102400, received["/__close_early"], 0]
    assert received["/__close_early"] > 0
    # Stopped: the access log and the spool hold every request.
    logged = {
        line["path"]: line["bytes_out"]
        for line in map(json.loads, (tmp_path / "access.log").read_text().splitlines())
    }
    reader = SpoolReader(tmp_path / "spool" / "w0")  # the one worker's spool
    try:
        captured = {
            f"{record.path}?{record.query}".rstrip("?"): record.bytes_out
            for _, record in reader.read_batch(100)
        }
    finally:
        reader.close()
    assert logged == received
    assert captured == received
