"""Running wrk and reading its report.

`parse_wrk_report` is a pure function of wrk's text output (as printed with
`--latency`), so it can be checked against saved reports; `run_wrk` is the IO around it.
A run counts as erroneous when wrk saw any socket error or any non-2xx/3xx response: a
proxy that answers 502 quickly is not fast.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import msgspec

from benchmarks._procs import pinned

# wrk prints latencies scaled from microseconds, durations scaled from seconds.
_TIME_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_BYTE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_METRIC_UNITS = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}

_TIME = r"([0-9.]+)(us|ms|s|m|h)"
_RE_TOTALS = re.compile(
    r"^\s*(\d+) requests in " + _TIME + r", ([0-9.]+)(B|KB|MB|GB|TB) read", re.M
)
_RE_THREAD_LATENCY = re.compile(r"^\s*Latency\s+" + _TIME + r"\s+" + _TIME + r"\s+" + _TIME, re.M)
_RE_PERCENTILE = re.compile(r"^\s*([0-9.]+)%\s+" + _TIME + r"\s*$", re.M)
_RE_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_RE_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
# Printed by the token-rotation script of `_modes.py` at the end of its run.
_RE_ROTATED_TOKENS = re.compile(r"^Rotated tokens: (.*)$", re.M)
_RE_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)([kMG]?)\s*$", re.M)


class WrkReportError(ValueError):
    """wrk's output lacks a figure the harness needs (the message quotes the output)."""


class WrkReport(msgspec.Struct, frozen=True, kw_only=True):
    """The figures of one wrk run; latencies in milliseconds."""

    requests: int
    duration_s: float
    requests_per_s: float
    read_bytes: int
    latency_avg_ms: float
    latency_max_ms: float
    percentiles_ms: dict[str, float]  # "50", "75", "90", "99" -> latency
    socket_errors: dict[str, int]  # connect, read, write, timeout
    non_2xx_3xx: int
    # What a token-rotation script reports: how many distinct tokens the run sent.
    rotated_tokens: str | None = None

    @property
    def errors(self) -> int:
        return self.non_2xx_3xx + sum(self.socket_errors.values())

    @property
    def p50_ms(self) -> float:
        return self.percentiles_ms["50"]

    @property
    def p99_ms(self) -> float:
        return self.percentiles_ms["99"]


def _seconds(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_S[unit]


def _ms(value: str, unit: str) -> float:
    # wrk prints 2 decimals; rounding drops float noise such as 49.35000000000001.
    return round(_seconds(value, unit) * 1e3, 6)


def _percentile_key(value: str) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() else str(number)


def parse_wrk_report(text: str) -> WrkReport:
    """Read the figures out of wrk's `--latency` report."""
    totals = _RE_TOTALS.search(text)
    rps = _RE_RPS.search(text)
    latency = _RE_THREAD_LATENCY.search(text)
    if totals is None or rps is None or latency is None:
        raise WrkReportError(f"not a complete wrk report:\n{text.strip()}")
    percentiles = {
        _percentile_key(m.group(1)): _ms(m.group(2), m.group(3))
        for m in _RE_PERCENTILE.finditer(text)
    }
    if "50" not in percentiles or "99" not in percentiles:
        raise WrkReportError(f"wrk report has no latency distribution (--latency):\n{text}")
    socket_errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    if (found := _RE_SOCKET_ERRORS.search(text)) is not None:
        socket_errors = dict(zip(socket_errors, map(int, found.groups()), strict=True))
    non_2xx = _RE_NON_2XX.search(text)
    rotated = _RE_ROTATED_TOKENS.search(text)
    return WrkReport(
        requests=int(totals.group(1)),
        duration_s=_seconds(totals.group(2), totals.group(3)),
        requests_per_s=float(rps.group(1)) * _METRIC_UNITS[rps.group(2)],
        read_bytes=round(float(totals.group(4)) * _BYTE_UNITS[totals.group(5)]),
        latency_avg_ms=_ms(latency.group(1), latency.group(2)),
        latency_max_ms=_ms(latency.group(5), latency.group(6)),
        percentiles_ms=percentiles,
        socket_errors=socket_errors,
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        rotated_tokens=rotated.group(1).strip() if rotated else None,
    )


def wrk_argv(
    url: str,
    *,
    connections: int,
    duration_s: float,
    headers: Sequence[str] = (),
    timeout_s: float = 2.0,
    cpu: int | None = None,
    script: Path | None = None,
) -> list[str]:
    """The wrk command line: 1 thread, `--latency`, pinned to `cpu` when given.

    `script` is a Lua script that builds the requests (its `request()` decides the
    headers actually sent; `headers` are still visible to it as `wrk.headers`).
    """
    argv = [
        "wrk",
        "--threads",
        "1",
        "--connections",
        str(connections),
        "--duration",
        f"{duration_s:g}s",
        "--timeout",
        f"{timeout_s:g}s",
        "--latency",
    ]
    for header in headers:
        argv += ["--header", header]
    if script is not None:
        argv += ["--script", str(script)]
    return pinned([*argv, url], cpu)


def run_wrk(argv: Sequence[str], *, duration_s: float) -> str:
    """Run wrk to completion and return its report; killed if the harness is interrupted."""
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    ) as wrk:
        try:
            stdout, stderr = wrk.communicate(timeout=duration_s + 30.0)
        except BaseException:
            wrk.kill()
            wrk.wait()
            raise
    if wrk.returncode != 0:
        raise WrkReportError(
            f"wrk exited with status {wrk.returncode}: {stderr.decode(errors='replace').strip()}"
            f"\n{stdout.decode(errors='replace').strip()}"
        )
    return stdout.decode(errors="replace")


def run_wrks(argvs: Sequence[Sequence[str]], *, duration_s: float) -> list[str]:
    """Run several wrk processes at the same time and return their reports in order;
    all are killed if one cannot be started or the harness is interrupted."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for argv in argvs:
            processes.append(
                subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
                )
            )
        results = [wrk.communicate(timeout=duration_s + 30.0) for wrk in processes]
    except BaseException:
        for wrk in processes:
            wrk.kill()
            wrk.wait()
        raise
    reports = []
    for wrk, (stdout, stderr) in zip(processes, results, strict=True):
        if wrk.returncode != 0:
            raise WrkReportError(
                f"wrk exited with status {wrk.returncode}: "
                f"{stderr.decode(errors='replace').strip()}\n{stdout.decode(errors='replace').strip()}"
            )
        reports.append(stdout.decode(errors="replace"))
    return reports
