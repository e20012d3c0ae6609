"""The tap's record carries every fact of the request, each in its own field."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from agent.capture import CaptureRecord
from agent.spool import SpoolFullError, SpoolOptions, SpoolReader, SpoolWriter
from proxy.authn.principal import Principal
from proxy.authz.engine import Decision
from proxy.authz.store import build_snapshot
from proxy.gate import Admission
from proxy.tap import Tap

POLICIES = Path(__file__).resolve().parents[3] / "policies"


def tapped(
    tmp_path: Path,
    admission: Admission | None,
    headers: dict[str, str],
    correlation_headers: tuple[str, ...] = ("X-Job-Run",),
    *,
    method: str = "GET",
    body_excerpt: bytes | None = None,
) -> CaptureRecord:
    """The one record a request leaves in a fresh spool, read back from it."""
    spool = SpoolWriter(tmp_path / "spool", SpoolOptions())
    tap = Tap(spool, service="http://sales.test", correlation_headers=correlation_headers)
    request = make_mocked_request(method, "/ignored", headers=CIMultiDict(headers))
    waiting = tap.record(
        request,
        request_id="req-1",
        time_ns=1_700_000_000_123_456_789,
        status=200,
        bytes_in=17,
        bytes_out=4321,
        duration_s=0.0025,
        admission=admission,
        body_excerpt=body_excerpt,
    )
    assert waiting is None
    assert spool.metrics.dropped_oversize == 0
    spool.close()
    reader = SpoolReader(tmp_path / "spool")
    try:
        [(_, record)] = reader.read_batch(10)
    finally:
        reader.close()
    return record


def test_an_admitted_sql_request_fills_every_field(tmp_path: Path) -> None:
    snapshot = build_snapshot(
        ("model.conf", (POLICIES / "model.conf").read_bytes()),
        [("policy.csv", b"p, analyst, database:sales, read, allow\n")],
        ("routes.yaml", (POLICIES / "routes.yaml").read_bytes()),
    )
    normalized, match = snapshot.routes.resolve("GET", "/sales?sql=select+id+from+orders")
    assert match is not None
    principal = Principal(id="alice", issuer="i", auth_method="jwt", roles=("analyst", "eu"))
    admission = Admission(
        target=normalized.upstream_target,
        principal=principal,
        match=match,
        decision=Decision(
            True, "allowed", rule=("analyst", "database:sales", "read"), source="p:1"
        ),
        outcome="allow",
    )
    record = tapped(
        tmp_path,
        admission,
        {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "vendor=1",
            "X-Job-Run": "nightly-42",
            "X-Other": "not copied",
        },
    )
    assert record == CaptureRecord(
        request_id="req-1",
        time_ns=1_700_000_000_123_456_789,
        service="http://sales.test",
        method="GET",
        path="/sales",
        status=200,
        principal="alice",
        roles=("analyst", "eu"),
        query="sql=select+id+from+orders",
        route="database",
        resource="database:sales",
        action="read",
        decision="allow",
        rule="analyst, database:sales, read",
        bytes_in=17,
        bytes_out=4321,
        duration_us=2500,
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracestate="vendor=1",
        correlation={"x-job-run": "nightly-42"},
        sql="select id from orders",
        sql_dialect="sqlite",
    )


def test_a_request_the_gate_never_saw_keeps_its_raw_target(tmp_path: Path) -> None:
    record = tapped(tmp_path, None, {})
    assert record == CaptureRecord(
        request_id="req-1",
        time_ns=1_700_000_000_123_456_789,
        service="http://sales.test",
        method="GET",
        path="/ignored",
        status=200,
        bytes_in=17,
        bytes_out=4321,
        duration_us=2500,
    )


def test_without_correlation_headers_configured_none_are_copied(tmp_path: Path) -> None:
    record = tapped(tmp_path, None, {"X-Job-Run": "nightly-42"}, correlation_headers=())
    assert record.correlation == {}
    assert record.path == "/ignored"


def test_the_largest_excerpt_allowed_fits_in_a_record(tmp_path: Path) -> None:
    # capture.body_excerpt_bytes is at most 128 KiB because a record holds the excerpt
    # twice (as SQL and as the excerpt) and bytes that are not UTF-8 decode to three
    # bytes each: the worst such body, with the longest trace headers, must still be
    # written, not dropped as oversize.
    routes = (
        b"version: 1\nroutes:\n  - name: q\n    methods: [POST]\n    path: /q\n"
        b"    resource: database:x\n    action: write\n"
        b"    sql: {from: body, param: sql, dialect: sqlite}\n"
    )
    snapshot = build_snapshot(
        ("model.conf", (POLICIES / "model.conf").read_bytes()),
        [("policy.csv", b"p, analyst, database:x, write, allow\n")],
        ("routes.yaml", routes),
    )
    normalized, match = snapshot.routes.resolve("POST", "/q")
    assert match is not None
    admission = Admission(target=normalized.upstream_target, match=match, outcome="allow")
    headers = {"Content-Type": "text/plain", "traceparent": "t" * 8000, "tracestate": "s" * 8000}
    excerpt = b"\xff" * (128 << 10)
    record = tapped(tmp_path, admission, headers, method="POST", body_excerpt=excerpt)
    assert record.body_excerpt == "\ufffd" * (128 << 10)
    assert record.sql == record.body_excerpt


async def test_a_record_waiting_for_room_is_kept_when_its_client_hangs_up(tmp_path: Path) -> None:
    # `when_full: block`: the request waits for room. A client that hangs up meanwhile
    # cancels the request (the server cancels its handler), not the record.
    spool = SpoolWriter(
        tmp_path,
        SpoolOptions(
            segment_bytes=2048,
            max_bytes=4096,
            max_record_bytes=512,
            flush_interval_s=0.005,
            when_full="block",
        ),
    )
    tap = Tap(spool, service="http://sales.test", correlation_headers=())
    count = 0
    while True:
        request = make_mocked_request("GET", f"/r{count}")
        waiting = tap.record(
            request,
            request_id=f"req-{count}",
            time_ns=1_700_000_000_000_000_000,
            status=200,
            bytes_in=0,
            bytes_out=0,
            duration_s=0.001,
            admission=None,
            body_excerpt=None,
        )
        count += 1
        if waiting is None:
            continue
        # Refused while records were still buffered: full only if it is still refused
        # once they are on disk (their framing is counted exactly there).
        await spool.flush_async()
        try:
            if spool.append(waiting):
                continue
        except SpoolFullError:
            break
    handler = asyncio.create_task(tap.append_wait(waiting))
    await spool.flush_async()
    assert not handler.done()
    handler.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await handler

    reader = SpoolReader(tmp_path)
    delivered = await reader.read(1000)
    assert len(delivered) == count - 1
    await reader.commit_async(delivered[-1][0])  # room again
    for _ in range(2000):
        await spool.flush_async()
        later = await reader.read(1000)
        if later:
            break
    else:
        pytest.fail("the waiting record never reached the spool")
    assert [record.request_id for _, record in later] == [f"req-{count - 1}"]
    assert tap.dropped == 0
    await spool.aclose()
    reader.close()
