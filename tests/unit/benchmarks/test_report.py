"""Medians, ratios to nginx and the table: what the reader of a benchmark sees."""

from __future__ import annotations

from benchmarks._report import RoundResult, TargetSummary, markdown_table, medians_of, with_ratios
from benchmarks._wrk import WrkReport


def _round(rps: float, p50: float, p99: float, rss: int, errors: int = 0) -> RoundResult:
    wrk = WrkReport(
        requests=int(rps * 10),
        duration_s=10.0,
        requests_per_s=rps,
        read_bytes=0,
        latency_avg_ms=p50,
        latency_max_ms=p99,
        percentiles_ms={"50": p50, "99": p99},
        socket_errors={"connect": 0, "read": 0, "write": 0, "timeout": 0},
        non_2xx_3xx=errors,
    )
    return RoundResult(
        round=1,
        started_at="2026-01-01T00:00:00+00:00",
        wrk=wrk,
        wrk_output="",
        peak_rss_kib=rss,
        server_cpu_s=9.0,
        upstream_cpu_s=1.0,
        other_cpu_on_server_core_s=0.0,
        interrupts_on_server_core_s=0.0,
        wrk_cpu_s=5.0,
        loadavg_before="0 0 0",
        loadavg_after="0 0 0",
    )


def _summary(name: str, rounds: list[RoundResult], compare_to: str = "nginx") -> TargetSummary:
    errors = sum(r.wrk.errors for r in rounds)
    return TargetSummary(
        name=name,
        description=name,
        tls=False,
        compare_to=compare_to,
        url=None,
        status="errors" if errors else "ok",
        failure=None,
        verification=None,
        rounds=rounds,
        errors=errors,
        medians=medians_of(rounds),
        ratios=None,
    )


def test_median_not_mean_of_rounds() -> None:
    medians = medians_of([_round(1000, 1.0, 5.0, 100), _round(2000, 2.0, 6.0, 300),
                          _round(90000, 9.0, 90.0, 200)])  # fmt: skip
    assert medians is not None
    assert medians.requests_per_s == 2000
    assert medians.p50_ms == 2.0
    assert medians.p99_ms == 6.0
    assert medians.peak_rss_kib == 300  # peak: the largest of the rounds
    assert medians.server_cpu_share == 0.9


def test_ratios_are_to_the_named_baseline() -> None:
    summaries = with_ratios(
        [
            _summary("nginx", [_round(20000, 1.0, 4.0, 1000)]),
            _summary("sidecar", [_round(5000, 4.0, 2.0, 5000)]),
            _summary("orphan", [_round(5000, 4.0, 2.0, 5000)], compare_to="missing"),
        ]
    )
    nginx, sidecar, orphan = summaries
    assert nginx.ratios is not None
    assert nginx.ratios.requests_per_s == 1.0
    assert sidecar.ratios is not None
    assert sidecar.ratios.requests_per_s == 0.25
    assert sidecar.ratios.p50_ms == 4.0
    assert sidecar.ratios.p99_ms == 0.5
    assert sidecar.ratios.peak_rss_kib == 5.0
    assert orphan.ratios is None


def test_table_marks_errors_and_failures() -> None:
    failed = TargetSummary(
        name="sidecar-tls", description="", tls=True, compare_to="nginx-tls", url=None,
        status="failed", failure="readyz did not answer 200\nlog tail", verification=None,
        rounds=[], errors=0, medians=None, ratios=None,
    )  # fmt: skip
    table = markdown_table(
        with_ratios(
            [
                _summary("nginx", [_round(20000, 1.0, 4.0, 1000)]),
                _summary("sidecar", [_round(5000, 4.0, 2.0, 5000, errors=7)]),
                failed,
            ]
        )
    )
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert rows["nginx"].rstrip().endswith("| ok |")
    assert "ERRORS: 7" in rows["sidecar"]
    assert "0.25x" in rows["sidecar"]
    assert "FAILED: readyz did not answer 200" in rows["sidecar-tls"]
