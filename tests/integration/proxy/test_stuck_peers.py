"""Peers that stop moving: an upstream that stops reading, a client that leaves or stops
reading, a full pool. Each ends in an answer (or a closed connection) for the client in
question, and the proxy goes on serving everyone else with the connections it has."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from proxy.tls import generate_dev_pair
from tests.integration.proxy.conftest import RunningProxy, run_proxy
from tests.integration.proxy.rawhttp import get, read_reply

# More than loopback socket buffers hold, so a stalled reader stalls the sender.
BIG_BODY = 256 * 1024 * 1024
# Safety net only: how long a test waits for something that should happen much sooner.
PATIENCE = 15.0


def upstream_log(upstream: str) -> list[dict[str, Any]]:
    """The echo upstream's request log, asked directly (the proxy's pool may be full)."""
    port = urlsplit(upstream).port
    assert port is not None
    entries: list[dict[str, Any]] = get(port, "/__log").json()
    return entries


def wait_until_upstream_has(upstream: str, target: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        if any(entry.get("target") == target for entry in upstream_log(upstream)):
            return
        time.sleep(0.05)
    raise AssertionError(f"the upstream never received {target}")


class BodyPusher(threading.Thread):
    """Sends `size` body bytes until done or the connection ends, counting what it sent."""

    def __init__(self, sock: socket.socket, size: int, block: bytes = b"x" * 65536) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.size = size
        self.block = block
        self.sent = 0
        self.start()

    def run(self) -> None:
        block = self.block
        try:
            while self.sent < self.size:
                self.sent += self.sock.send(block[: self.size - self.sent])
        except OSError:
            pass  # the proxy answered and closed, or the test hung up

    def wait_until_stuck(self) -> None:
        """Until no byte moves: every buffer on the way is full (or the proxy answered)."""
        deadline = time.monotonic() + PATIENCE
        last = -1
        while self.sent != last and time.monotonic() < deadline:
            last = self.sent
            time.sleep(0.3)


@pytest.fixture
def one_connection_proxy(echo_upstream: str, tmp_path: Path) -> Iterator[RunningProxy]:
    """A proxy allowed a single upstream connection: any leak stops all service."""
    with run_proxy(
        tmp_path,
        echo_upstream,
        proxy={"timeouts": {"read": 1.0, "client_body": 5.0}, "pool": {"max_connections": 1}},
    ) as running:
        yield running


def test_upstream_that_stops_reading_the_body_gives_504_then_serves_again(
    one_connection_proxy: RunningProxy,
) -> None:
    with socket.create_connection(("127.0.0.1", one_connection_proxy.port)) as sock:
        sock.settimeout(PATIENCE)
        sock.sendall(
            b"POST /__no_read HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % BIG_BODY
        )
        sender = BodyPusher(sock, BIG_BODY)
        reply = read_reply(sock)
        assert reply.status == 504
        assert reply.json()["error"] == "upstream_timeout"
        sock.shutdown(socket.SHUT_RDWR)
    sender.join(PATIENCE)
    # The single pooled connection came back (closed, not leaked): the next request works.
    after = get(one_connection_proxy.port, "/after-stalled-body")
    assert after.status == 200
    assert after.json()["target"] == "/after-stalled-body"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_upstream_that_answers_before_taking_the_body_has_its_answer_passed_on(
    one_connection_proxy: RunningProxy, echo_upstream: str, chunked: bool
) -> None:
    # A server refusing an upload (413) answers at once and stops reading; the client must
    # get that answer, not a 504 once the proxy's writes stall (the read timeout is 1 s).
    target = f"/__answer_early?code=413&{uuid.uuid4().hex}"
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % BIG_BODY
    with socket.create_connection(("127.0.0.1", one_connection_proxy.port)) as sock:
        sock.settimeout(PATIENCE)
        sock.sendall(b"POST %b HTTP/1.1\r\nHost: a\r\n%b\r\n\r\n" % (target.encode(), framing))
        if chunked:
            block = b"10000\r\n" + b"x" * 65536 + b"\r\n"
            sender = BodyPusher(sock, BIG_BODY, block)
        else:
            sender = BodyPusher(sock, BIG_BODY)
        reply = read_reply(sock)
        # The upstream's own answer, not the proxy's 504 once its writes stalled.
        assert (reply.status, reply.json()) == (413, {"early": 413})
        assert reply.header("X-Upstream") == "echo"
        sock.shutdown(socket.SHUT_RDWR)
    sender.join(PATIENCE)
    # The body went out cut short, so that upstream connection is closed, not pooled: the
    # next request (the pool holds one connection) comes on a new one, and is served.
    after = get(one_connection_proxy.port, "/after-early-answer")
    assert after.status == 200
    early = [e for e in upstream_log(echo_upstream) if e.get("target") == target]
    assert early
    assert early[0]["answered_early"]
    assert after.json()["connection"] != early[0]["connection"]


def test_an_upstream_that_streams_its_answer_while_reading_gets_the_whole_body(
    one_connection_proxy: RunningProxy, echo_upstream: str
) -> None:
    # Only a complete early answer ends the body: this upstream sends its head at once and
    # finishes its answer only after reading every byte. Stopping the body at its head
    # would leave it waiting, and the client with a cut answer.
    size = 8 * 1024 * 1024  # more than the loopback buffers hold once the head is out
    target = f"/__answer_then_read?{uuid.uuid4().hex}"
    with socket.create_connection(("127.0.0.1", one_connection_proxy.port)) as sock:
        sock.settimeout(PATIENCE)
        sock.sendall(
            b"POST %b HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (target.encode(), size)
        )
        sender = BodyPusher(sock, size)
        reply = read_reply(sock)
        sender.join(PATIENCE)
    assert reply.status == 200
    first, last = reply.body.split(b"\n", 1)
    assert first == b"started"
    assert json.loads(last) == {"body_length": size}
    [logged] = [e for e in upstream_log(echo_upstream) if e.get("target") == target]
    assert logged["complete"] is True
    assert logged["body_length"] == size


def test_client_that_hangs_up_while_the_upstream_stalls_on_its_body_frees_the_connection(
    one_connection_proxy: RunningProxy, echo_upstream: str
) -> None:
    # The proxy stopped reading this client (back-pressure), so it cannot see the hang-up;
    # the stalled upstream write is what ends the exchange (t9 in the bug hunt).
    target = f"/__no_read?{uuid.uuid4().hex}"
    with socket.create_connection(("127.0.0.1", one_connection_proxy.port)) as sock:
        sock.sendall(
            b"POST %b HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
            % (target.encode(), BIG_BODY)
        )
        sender = BodyPusher(sock, BIG_BODY)
        wait_until_upstream_has(echo_upstream, target)
        sender.wait_until_stuck()
        sock.shutdown(socket.SHUT_RDWR)
    sender.join(PATIENCE)
    after = get(one_connection_proxy.port, "/after-hang-up")
    assert after.status == 200
    assert after.json()["target"] == "/after-hang-up"


def test_client_that_hangs_up_awaiting_the_answer_frees_the_connection_at_once(
    echo_upstream: str, tmp_path: Path
) -> None:
    # A read timeout far beyond the test's patience: only the hang-up can free the slot.
    with run_proxy(
        tmp_path,
        echo_upstream,
        proxy={"timeouts": {"read": 60.0}, "pool": {"max_connections": 1}},
    ) as proxy:
        target = f"/__slow?ms=60000&{uuid.uuid4().hex}"
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"GET %b HTTP/1.1\r\nHost: a\r\n\r\n" % target.encode())
            wait_until_upstream_has(echo_upstream, target)
        after = get(proxy.port, "/after-hang-up")
        assert after.status == 200
        assert after.json()["target"] == "/after-hang-up"


def test_clients_that_stop_reading_big_responses_are_cut_off_and_others_served(
    echo_upstream: str, tmp_path: Path
) -> None:
    with run_proxy(
        tmp_path,
        echo_upstream,
        proxy={
            "timeouts": {"read": 5.0, "client_write": 1.0},
            "pool": {"max_connections": 2},
        },
    ) as proxy:
        stuck: list[socket.socket] = []
        for _ in range(2):
            target = f"/__big?bytes=500000000&{uuid.uuid4().hex}"
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(PATIENCE)
            sock.connect(("127.0.0.1", proxy.port))
            sock.sendall(b"GET %b HTTP/1.1\r\nHost: a\r\n\r\n" % target.encode())
            wait_until_upstream_has(echo_upstream, target)
            stuck.append(sock)
        # Both pooled connections are held by clients that read nothing; a third client
        # is served once the proxy gives up on them.
        after = get(proxy.port, "/while-others-stall")
        assert after.status == 200
        assert after.json()["target"] == "/while-others-stall"
        # Reading now would revive a stalled download, so first wait (without reading) for
        # the proxy to hold no client connection; then each stalled one ends cut short.
        wait_until_no_client_connections(proxy)
        for sock in stuck:
            with sock:
                assert ends_before_the_whole_body(sock, 500_000_000)


def wait_until_no_client_connections(proxy: RunningProxy) -> None:
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        metrics = get(proxy.admin_port, "/metrics").body.decode()
        if "lineage_sidecar_active_connections 0.0" in metrics.splitlines():
            return
        time.sleep(0.1)


def ends_before_the_whole_body(sock: socket.socket, size: int) -> bool:
    """True when the proxy closed the connection before sending `size` bytes."""
    received = 0
    try:
        while received < size:
            data = sock.recv(1 << 20)
            if not data:
                return True
            received += len(data)
    except ConnectionResetError:
        return True
    return False


def test_full_pool_answers_503_after_the_connect_timeout(
    echo_upstream: str, tmp_path: Path
) -> None:
    with run_proxy(
        tmp_path,
        echo_upstream,
        proxy={"timeouts": {"read": 60.0, "connect": 0.5}, "pool": {"max_connections": 1}},
    ) as proxy:
        target = f"/__slow?ms=60000&{uuid.uuid4().hex}"
        with socket.create_connection(("127.0.0.1", proxy.port)) as holder:
            holder.sendall(b"GET %b HTTP/1.1\r\nHost: a\r\n\r\n" % target.encode())
            wait_until_upstream_has(echo_upstream, target)
            queued = get(proxy.port, "/queued")
            assert queued.status == 503
            assert queued.json()["error"] == "upstream_pool_exhausted"
            assert queued.header("X-Request-Id")
        metrics = get(proxy.admin_port, "/metrics").body.decode()
        assert 'lineage_sidecar_upstream_errors_total{kind="pool_exhausted"} 1.0' in metrics


@pytest.fixture
def header_timeout_proxy(echo_upstream: str, tmp_path: Path) -> Iterator[RunningProxy]:
    with run_proxy(tmp_path, echo_upstream, proxy={"timeouts": {"request_header": 1.0}}) as running:
        yield running


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    try:
        while data := sock.recv(65536):
            received += data
    except ConnectionResetError:
        pass
    return received


def trickle_until_closed(sock: socket.socket) -> bytes:
    """Send one header byte every 0.2 s, never finishing the head, until the proxy closes
    the connection; what it sent back."""
    stop = threading.Event()

    def trickle() -> None:
        try:
            while not stop.wait(0.2):
                sock.send(b"x")
        except OSError:
            pass

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        return read_until_closed(sock)
    finally:
        stop.set()
        sender.join(PATIENCE)


def test_slowloris_connection_is_answered_408_and_closed(
    header_timeout_proxy: RunningProxy,
) -> None:
    with socket.create_connection(("127.0.0.1", header_timeout_proxy.port)) as sock:
        sock.settimeout(PATIENCE)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        received = trickle_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 408 ")
    assert b'"error":"request_header_timeout"' in received


def test_connection_that_never_sends_a_byte_is_closed(header_timeout_proxy: RunningProxy) -> None:
    with socket.create_connection(("127.0.0.1", header_timeout_proxy.port)) as sock:
        sock.settimeout(PATIENCE)
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["nothing", "half-hello"])
def test_a_tls_handshake_that_never_finishes_is_closed_after_the_head_timeout(
    echo_upstream: str, tmp_path: Path, sent: bytes
) -> None:
    # Slowloris one layer down: asyncio's own handshake bound is 60 s, past this test's
    # patience; `timeouts.request_header` bounds the handshake too.
    paths = generate_dev_pair(tmp_path / "certs")
    tls = {"enabled": True, "cert_file": str(paths.cert_file), "key_file": str(paths.key_file)}
    with (
        run_proxy(
            tmp_path, echo_upstream, tls=tls, proxy={"timeouts": {"request_header": 1.0}}
        ) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port)) as sock,
    ):
        sock.settimeout(PATIENCE)
        sock.sendall(sent)
        assert read_until_closed(sock) == b""


def test_keep_alive_connection_outlives_the_header_timeout_between_requests(
    header_timeout_proxy: RunningProxy,
) -> None:
    with socket.create_connection(("127.0.0.1", header_timeout_proxy.port)) as sock:
        sock.settimeout(PATIENCE)
        sock.sendall(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_reply(sock).json()["target"] == "/first"
        # Idle for twice the header timeout: keep-alive idleness is not a slow head.
        time.sleep(2.0)
        sock.sendall(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
        second = read_reply(sock)
        assert second.status == 200
        assert second.json()["target"] == "/second"


def test_slow_head_after_a_kept_alive_request_is_answered_408_and_closed(
    header_timeout_proxy: RunningProxy,
) -> None:
    # One quick request first, then the next head a byte at a time: the deadline holds
    # for every request head, not only a new connection's first.
    with socket.create_connection(("127.0.0.1", header_timeout_proxy.port)) as sock:
        sock.settimeout(PATIENCE)
        sock.sendall(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_reply(sock).json()["target"] == "/first"
        sock.sendall(b"GET /second HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        received = trickle_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 408 ")
    assert b'"error":"request_header_timeout"' in received


def test_clients_that_reset_mid_download_are_recorded_499_without_an_error(
    echo_upstream: str, tmp_path: Path
) -> None:
    # A reset the proxy notices on a write (the transport is closing before the server has
    # cancelled the handler) is the same hang-up as one it notices on a read.
    with run_proxy(tmp_path, echo_upstream) as proxy:
        for n in range(20):
            with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
                sock.settimeout(PATIENCE)
                sock.sendall(b"GET /__big?bytes=200000000&reset=%d HTTP/1.1\r\nHost: a\r\n\r\n" % n)
                received = 0
                while received < 1 << 20:
                    received += len(sock.recv(1 << 20))
                # Close with unread data and no linger: a reset, as a killed client sends.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        after = get(proxy.port, "/after-resets")
        assert after.status == 200
    log = proxy.log.read_text()
    assert "error handling request" not in log.lower()
    lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    statuses = {line["status"] for line in lines if "reset=" in line["path"]}
    assert statuses == {499}
