"""A full capture spool, on a real proxy: traffic goes on (fail_open), and every request
is accounted for on /metrics, as appended or as dropped, with /readyz and the log saying
why. Nothing disappears uncounted."""

from __future__ import annotations

import http.client
import json
import select
import socket
import time
from pathlib import Path

from tests.integration.proxy.conftest import run_proxy
from tests.integration.proxy.rawhttp import get, read_reply

SPOOL_BYTES = 4 << 20  # the smallest spool the configuration allows
TRACE_STATE = "vendor=" + "x" * 6000  # each record carries it: about 6 KB a record


def _samples(admin_port: int) -> dict[str, float]:
    reply = get(admin_port, "/metrics")
    assert reply.status == 200
    return {
        name: float(value)
        for line in reply.body.decode().splitlines()
        if line and not line.startswith("#")
        for name, _, value in [line.rpartition(" ")]
    }


def test_a_full_spool_drops_counts_and_says_so(echo_upstream: str, tmp_path: Path) -> None:
    extra = {
        "capture": {
            "spool_dir": str(tmp_path / "spool"),
            "max_bytes": SPOOL_BYTES,
            "when_full": "fail_open",
        }
    }
    with run_proxy(tmp_path, echo_upstream, extra=extra) as proxy:
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        sent = 0
        try:
            # Enough records to fill the spool twice over: no agent is reading it.
            for _ in range(2 * SPOOL_BYTES // len(TRACE_STATE)):
                connection.request("GET", "/tables/sales.json", headers={"tracestate": TRACE_STATE})
                response = connection.getresponse()
                response.read()
                assert response.status == 200  # fail_open: the traffic goes on
                sent += 1
        finally:
            connection.close()
        # Served through (fail_open): said, but not a reason to take traffic away.
        ready = get(proxy.admin_port, "/readyz")
        assert ready.status == 200
        assert ready.json()["ready"] is True
        assert "degraded: capture spool is full" in ready.body.decode()
        appended = 'lineage_sidecar_capture_records_total{result="appended"}'
        dropped = 'lineage_sidecar_capture_records_total{result="dropped_full"}'
        deadline = time.monotonic() + 10
        while True:
            samples = _samples(proxy.admin_port)
            if samples.get(appended, 0) + samples.get(dropped, 0) == sent:
                break
            assert time.monotonic() < deadline, (sent, samples.get(appended), samples.get(dropped))
            time.sleep(0.1)
        assert samples[dropped] > 0
        assert samples["lineage_sidecar_spool_full"] == 1
        assert samples["lineage_sidecar_spool_bytes"] <= SPOOL_BYTES
        assert samples['lineage_sidecar_capture_records_total{result="dropped_oversize"}'] == 0
    log = proxy.log.read_text()
    assert "dropping capture records (fail_open)" in log


def test_a_client_that_hangs_up_while_its_record_waits_for_room_is_still_in_the_access_log(
    echo_upstream: str, tmp_path: Path
) -> None:
    # `when_full: block`: once the spool is full, a request waits for room before it is
    # answered. Its client hanging up cancels the handler there; the request happened all
    # the same (the upstream answered it), so the access log has its line.
    extra = {
        "capture": {
            "spool_dir": str(tmp_path / "spool"),
            "max_bytes": SPOOL_BYTES,
            "when_full": "block",
        }
    }
    blocked = "lineage_sidecar_capture_blocked_total"
    hung_up = None
    with run_proxy(tmp_path, echo_upstream, extra=extra) as proxy:
        deadline = time.monotonic() + 120  # a safety net: about 700 requests fill it
        for n in range(4 * SPOOL_BYTES // len(TRACE_STATE)):
            target = f"/fill-{n}"
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            sock.sendall(
                f"GET {target} HTTP/1.1\r\nHost: a\r\ntracestate: {TRACE_STATE}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            # Answered, or held back waiting for room (which /metrics counts).
            while not select.select([sock], [], [], 0.2)[0]:
                if _samples(proxy.admin_port).get(blocked, 0) > 0:
                    hung_up = target
                    break
                assert time.monotonic() < deadline
            if hung_up is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                sock.close()  # the client hangs up
                break
            with sock:
                assert read_reply(sock).status == 200
        assert hung_up is not None
    lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert hung_up in {line["path"] for line in lines}
