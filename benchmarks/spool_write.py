"""What capture costs the proxy's hot path: `SpoolWriter.append` against its parts.

Run: `python -m benchmarks.spool_write [--records N] [--rounds N] [--proxy-rps R
[--proxy-cpu-share S]]`.

Each round times N appends of a typical capture record (a JSON API GET with principal,
roles, route, resource, traceparent and a correlation header) into a real spool in a
temporary directory, with the writer thread writing and fsyncing in the background as it
does in production (so its share of the GIL is inside the figure). In the same run, and
interleaved round by round, it times the baselines: an empty loop (the harness itself)
and msgspec encoding alone (the part no spool design can avoid). It reports the median
over rounds. Given the proxy's pass-through rate and the CPU share it used for it (both
from `benchmarks.proxy`), it also prints the share of proxy throughput one append per
request would cost: append / (proxy CPU per request + append).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable

import msgspec

from agent.capture import CaptureRecord
from agent.spool import SpoolOptions, SpoolWriter


def typical_record(index: int) -> CaptureRecord:
    return CaptureRecord(
        request_id=f"7f3c9a1e-5b2d-4c8e-9a10-{index:012d}",
        time_ns=1_764_160_000_000_000_000 + index,
        service="https://sales-db.internal:8001",
        principal="alice@example.com",
        roles=("analyst", "sales-read"),
        method="GET",
        path="/sales/orders.json",
        query="_size=100&region=emea",
        route="datasette-table",
        resource="sales/orders",
        action="read",
        decision="allow",
        rule="p, analyst, sales/*, read",
        status=200,
        bytes_in=0,
        bytes_out=18_234,
        duration_us=2_417,
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        correlation={"x-job-run-id": "nightly-etl-2026-11-26"},
    )


def time_round(count: int, step: Callable[[CaptureRecord], object]) -> float:
    """Seconds per call of step over `count` pre-built records."""
    records = [typical_record(i) for i in range(count)]
    start = time.perf_counter()
    for record in records:
        step(record)
    return (time.perf_counter() - start) / count


def time_round_async(count: int, writer: SpoolWriter) -> float:
    records = [typical_record(i) for i in range(count)]

    async def run() -> float:
        start = time.perf_counter()
        for record in records:
            await writer.append_wait(record)
        return (time.perf_counter() - start) / count

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=20_000, help="appends per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--proxy-rps",
        type=float,
        default=None,
        help="pass-through requests/s of one proxy worker (from benchmarks.proxy)",
    )
    parser.add_argument(
        "--proxy-cpu-share",
        type=float,
        default=1.0,
        help="CPU share the proxy used at that rate (benchmarks.proxy 'server CPU', 1.0 = 100%%)",
    )
    args = parser.parse_args(argv)

    encoder = msgspec.msgpack.Encoder()
    payload_bytes = len(encoder.encode(typical_record(0)))
    samples: dict[str, list[float]] = {
        "empty loop": [],
        "msgspec encode only": [],
        "append": [],
        "append_wait (async)": [],
    }
    with tempfile.TemporaryDirectory(prefix="spool-bench-") as directory:
        options = SpoolOptions(max_bytes=4 << 30, segment_bytes=64 << 20)
        writer = SpoolWriter(directory, options)
        wall_start = time.perf_counter()
        for _round in range(args.rounds):
            samples["empty loop"].append(time_round(args.records, lambda _record: None))
            samples["msgspec encode only"].append(time_round(args.records, encoder.encode))
            samples["append"].append(time_round(args.records, writer.append))
            samples["append_wait (async)"].append(time_round_async(args.records, writer))
        writer.flush()
        wall = time.perf_counter() - wall_start
        metrics = writer.metrics
        writer.close()

    print(f"spool write benchmark: {args.rounds} rounds x {args.records} appends per variant")
    print(f"record: {payload_bytes} bytes msgpack + 8 bytes frame header")
    print(f"{'variant':<24}{'median us/call':>16}{'calls/s':>14}{'min us':>10}{'max us':>10}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(
            f"{name:<24}{median * 1e6:>16.3f}{1 / median:>14,.0f}"
            f"{min(values) * 1e6:>10.3f}{max(values) * 1e6:>10.3f}"
        )
    append_cost = statistics.median(samples["append"])
    encode_cost = statistics.median(samples["msgspec encode only"])
    print(f"append / encode-only: {append_cost / encode_cost:.2f}x")
    print(
        f"writer thread: {metrics.fsyncs} fsyncs, {metrics.segments_created} segments, "
        f"{metrics.flushed_records} records written in {wall:.2f} s of the whole run"
    )
    if args.proxy_rps:
        proxy_us = args.proxy_cpu_share * 1e6 / args.proxy_rps
        share = append_cost * 1e6 / (proxy_us + append_cost * 1e6)
        print(
            f"proxy: {proxy_us:.1f} us CPU per pass-through request "
            f"({args.proxy_rps:,.0f} req/s at {args.proxy_cpu_share:.0%} CPU); one append "
            f"per request costs {share * 100:.2f}% of proxy throughput (target: under 5%)"
        )


if __name__ == "__main__":
    main()
