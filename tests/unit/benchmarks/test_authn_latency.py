"""The authentication latency benchmark: its percentiles, and that it runs end to end."""

from __future__ import annotations

import asyncio

from benchmarks.authn_latency import measure, percentiles


def test_percentiles_are_nearest_rank_in_microseconds() -> None:
    samples_ns = [value * 1000 for value in range(1000, 0, -1)]  # 1..1000 µs, shuffled order
    assert percentiles(samples_ns) == {"p50_us": 501.0, "p99_us": 991.0, "max_us": 1000.0}


def test_a_short_run_measures_all_three_rows() -> None:
    # Real tokens, real signature checks: a token the proxy refused would raise here.
    figures = asyncio.run(measure(100, 1))
    assert set(figures) == {"miss", "hit", "pyjwt"}
    for row in figures.values():
        assert 0 < row["p50_us"] <= row["p99_us"] <= row["max_us"]
