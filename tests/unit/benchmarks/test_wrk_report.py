"""wrk's text report is read into exact figures, and errors in it are never lost."""

from __future__ import annotations

import pytest

from benchmarks._wrk import WrkReportError, parse_wrk_report, wrk_argv

CLEAN_RUN = """\
Running 2s test @ http://127.0.0.1:57167/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.99ms    4.69ms  49.35ms   95.46%
    Req/Sec    30.30k    10.86k   42.45k    60.00%
  Latency Distribution
     50%    0.86ms
     75%    1.16ms
     90%    3.17ms
     99%   27.03ms
  60296 requests in 2.00s, 14.38MB read
Requests/sec:  30129.27
Transfer/sec:      7.18MB
"""

RUN_WITH_ERRORS = """\
Running 10s test @ https://127.0.0.1:8443/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.00us  100.00us    1.20s    90.00%
    Req/Sec     5.00k   200.00     5.50k    70.00%
  Latency Distribution
     50%  650.00us
     75%  900.00us
     90%    1.10ms
     99%    1.02s
  531 requests in 1.01m, 127.56KB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 531
Requests/sec:    526.71
Transfer/sec:    126.53KB
"""


def test_clean_run_figures() -> None:
    report = parse_wrk_report(CLEAN_RUN)
    assert report.requests == 60296
    assert report.duration_s == 2.0
    assert report.requests_per_s == 30129.27
    assert report.p50_ms == 0.86
    assert report.p99_ms == 27.03
    assert report.percentiles_ms == {"50": 0.86, "75": 1.16, "90": 3.17, "99": 27.03}
    assert report.latency_avg_ms == 1.99
    assert report.latency_max_ms == 49.35
    assert report.read_bytes == round(14.38 * 1024**2)
    assert report.errors == 0


def test_units_and_errors_are_read() -> None:
    report = parse_wrk_report(RUN_WITH_ERRORS)
    assert report.p50_ms == 0.65
    assert report.p99_ms == 1020.0
    assert report.latency_max_ms == 1200.0
    assert report.duration_s == pytest.approx(60.6)
    assert report.read_bytes == round(127.56 * 1024)
    assert report.socket_errors == {"connect": 1, "read": 2, "write": 3, "timeout": 4}
    assert report.non_2xx_3xx == 531
    assert report.errors == 531 + 10


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unable to connect to 127.0.0.1:1 Connection refused\n",
        CLEAN_RUN.replace("  Latency Distribution\n", "").replace("     99%   27.03ms\n", ""),
        CLEAN_RUN.replace("Requests/sec:  30129.27\n", ""),
    ],
)
def test_incomplete_reports_are_refused(text: str) -> None:
    with pytest.raises(WrkReportError):
        parse_wrk_report(text)


def test_wrk_command_line() -> None:
    argv = wrk_argv("http://127.0.0.1:1/", connections=32, duration_s=10, headers=["X-A: 1"], cpu=0)
    assert argv[:3] == ["taskset", "-c", "0"]
    assert argv[-1] == "http://127.0.0.1:1/"
    assert "--latency" in argv
    assert argv[argv.index("--connections") + 1] == "32"
    assert argv[argv.index("--threads") + 1] == "1"
    assert argv[argv.index("--duration") + 1] == "10s"
    assert argv[argv.index("--header") + 1] == "X-A: 1"
    assert wrk_argv("http://x/", connections=1, duration_s=2.5)[0] == "wrk"
