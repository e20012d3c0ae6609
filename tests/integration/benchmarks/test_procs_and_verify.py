"""Servers the harness starts are always stopped whole; a fast wrong answer is refused."""

from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks._nginx import UPSTREAM_BODY
from benchmarks._probe import TargetFailed
from benchmarks._procs import ManagedProcess, peak_rss_kib, process_tree
from benchmarks._targets import BenchContext, Target, verify
from benchmarks._tls import make_test_pki
from lineage_sidecar.ports import free_port


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    # A parent that ignores SIGTERM and a background grandchild: both must go.
    server = ManagedProcess(
        "tree", ["sh", "-c", "trap '' TERM; sleep 300 & sleep 300; wait"], tmp_path
    )
    server.start()
    try:
        deadline = time.monotonic() + 5
        while len(process_tree([server.pid])) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = process_tree([server.pid])
        assert len(tree) >= 3
        assert peak_rss_kib([server.pid]) > 0
    finally:
        server.stop(grace_s=0.5)
    # SIGKILL of the group is delivered at once but a grandchild dies a moment later.
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in tree)
    assert not server.running()


def test_failure_report_carries_the_log_tail(tmp_path: Path) -> None:
    server = ManagedProcess(
        "bad", ["sh", "-c", "echo 'bind: address in use' >&2; exit 3"], tmp_path
    )
    server.start()
    deadline = time.monotonic() + 5
    while server.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    report = server.failure_report("did not start")
    server.stop()
    assert "exit status 3" in report
    assert "bind: address in use" in report


def test_free_ports_are_not_repeated() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)


class _FixedAnswer(http.server.BaseHTTPRequestHandler):
    status = 502
    body = b'{"error":"bad gateway"}'

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Fixed(Target):
    def __init__(self, port: int) -> None:
        self.name, self.description, self.tls, self.compare_to = "fixed", "", False, "nginx"
        self.port = port

    def start(self, ctx: BenchContext) -> None:
        pass

    def stop(self) -> None:
        pass

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def pids(self) -> list[int]:
        return [os.getpid()]


@pytest.fixture
def answering_502() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FixedAnswer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_fast_502_is_not_accepted(tmp_path: Path, answering_502: int) -> None:
    pki = make_test_pki(tmp_path)
    with pytest.raises(TargetFailed, match="answered 502"):
        verify(_Fixed(answering_502), pki)
    assert UPSTREAM_BODY.startswith(b"{")
