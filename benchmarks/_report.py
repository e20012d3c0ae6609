"""From per-round measurements to medians, ratios and the markdown table (no IO).

Per target: the median over rounds of requests/s, p50 and p99, the peak RSS over all
rounds, and each as a ratio to the target named in `compare_to` (nginx in the same TLS
mode) and, for the sidecar's modes, to the pass-through sidecar (`pass_through`). A target
with any wrk error in any round is marked, never silently averaged in.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import msgspec

from benchmarks._probe import Verification
from benchmarks._wrk import WrkReport


class RoundResult(msgspec.Struct, frozen=True, kw_only=True):
    """One measured wrk run of one target, with what the server used meanwhile."""

    round: int
    started_at: str
    wrk: WrkReport
    wrk_output: str
    peak_rss_kib: int  # VmHWM summed over the server's process tree, since its start
    server_cpu_s: float  # CPU time the system under test used during the run
    upstream_cpu_s: float  # CPU time the upstream used during the run (same core)
    # Process time on the server core not spent in our servers (other load, steal).
    other_cpu_on_server_core_s: float
    interrupts_on_server_core_s: float  # irq + softirq time on the server core
    wrk_cpu_s: float  # CPU time of wrk itself (near the duration: wrk is the limit)
    loadavg_before: str
    loadavg_after: str


class Medians(msgspec.Struct, frozen=True, kw_only=True):
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    peak_rss_kib: int
    server_cpu_share: float  # CPU seconds per wall second of the system under test
    upstream_cpu_share: float  # the same for the upstream, which shares the server CPU
    other_cpu_share: float  # the same for everything else that ran on the server CPU
    wrk_cpu_share: float  # CPU share of the load generator (near 1.0: wrk is the limit)


class Ratios(msgspec.Struct, frozen=True, kw_only=True):
    """Target figure divided by the baseline figure (requests/s: higher is better)."""

    requests_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    peak_rss_kib: float | None


class TargetSummary(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    tls: bool
    compare_to: str
    url: str | None
    status: str  # "ok", "errors" (wrk saw errors) or "failed" (did not start/verify)
    failure: str | None
    verification: Verification | None
    rounds: list[RoundResult]
    errors: int
    medians: Medians | None
    ratios: Ratios | None
    # A mode's ratios to the pass-through sidecar of the same TLS mode and run.
    pass_through: str | None = None
    pass_through_ratios: Ratios | None = None
    # A JWT mode's ratios to the pass-through sidecar sent the same requests.
    same_requests: str | None = None
    same_requests_ratios: Ratios | None = None


def _share_of_run(seconds: Sequence[float], rounds: Sequence[RoundResult]) -> float:
    """Median over rounds of CPU seconds per second of wrk's run."""
    share = statistics.median(
        s / r.wrk.duration_s if r.wrk.duration_s else 0.0
        for s, r in zip(seconds, rounds, strict=True)
    )
    return round(share, 4)


def medians_of(rounds: Sequence[RoundResult]) -> Medians | None:
    if not rounds:
        return None
    return Medians(
        requests_per_s=statistics.median(r.wrk.requests_per_s for r in rounds),
        p50_ms=statistics.median(r.wrk.p50_ms for r in rounds),
        p99_ms=statistics.median(r.wrk.p99_ms for r in rounds),
        peak_rss_kib=max(r.peak_rss_kib for r in rounds),
        server_cpu_share=_share_of_run([r.server_cpu_s for r in rounds], rounds),
        upstream_cpu_share=_share_of_run([r.upstream_cpu_s for r in rounds], rounds),
        other_cpu_share=_share_of_run([r.other_cpu_on_server_core_s for r in rounds], rounds),
        wrk_cpu_share=_share_of_run([r.wrk_cpu_s for r in rounds], rounds),
    )


def _ratio(value: float, baseline: float) -> float | None:
    return round(value / baseline, 4) if baseline else None


def ratios_of(medians: Medians | None, baseline: Medians | None) -> Ratios | None:
    if medians is None or baseline is None:
        return None
    return Ratios(
        requests_per_s=_ratio(medians.requests_per_s, baseline.requests_per_s),
        p50_ms=_ratio(medians.p50_ms, baseline.p50_ms),
        p99_ms=_ratio(medians.p99_ms, baseline.p99_ms),
        peak_rss_kib=_ratio(medians.peak_rss_kib, baseline.peak_rss_kib),
    )


def with_ratios(summaries: Sequence[TargetSummary]) -> list[TargetSummary]:
    """Fill in `ratios` (to `compare_to`), `pass_through_ratios` (to `pass_through`) and
    `same_requests_ratios` (to `same_requests`)."""
    by_name = {s.name: s for s in summaries}

    def baseline_medians(name: str | None) -> Medians | None:
        baseline = by_name.get(name) if name is not None else None
        return baseline.medians if baseline is not None else None

    return [
        msgspec.structs.replace(
            summary,
            ratios=ratios_of(summary.medians, baseline_medians(summary.compare_to)),
            pass_through_ratios=ratios_of(summary.medians, baseline_medians(summary.pass_through)),
            same_requests_ratios=ratios_of(
                summary.medians, baseline_medians(summary.same_requests)
            ),
        )
        for summary in summaries
    ]


def _fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def markdown_table(summaries: Sequence[TargetSummary]) -> str:
    """One row per target; "vs nginx" ratios are to `compare_to` (nginx, same TLS). When
    any row is a mode, "vs pass-through" columns give req/s and p99 to `pass_through`."""
    modes = any(s.pass_through is not None for s in summaries)
    mode_head = " vs pass-through | vs same requests | p99 vs pass-through |" if modes else ""
    lines = [
        f"| target | TLS | req/s | vs nginx |{mode_head} p50 ms | vs nginx | p99 ms | vs nginx "
        "| peak RSS MiB | vs nginx | server CPU | upstream CPU | other CPU | wrk CPU | status |",
        "|---|---|---:|---:|"
        + ("---:|---:|---:|" if modes else "")
        + "---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in summaries:
        tls = "1.3" if s.tls else "-"
        if s.medians is None:
            reason = (s.failure or "no data").strip().splitlines()[0][:120]
            empty = "  |" * (15 if modes else 12)
            lines.append(f"| {s.name} | {tls} |{empty} FAILED: {reason} |")
            continue
        m, r, pt, same = s.medians, s.ratios, s.pass_through_ratios, s.same_requests_ratios
        status = "ok" if s.status == "ok" else f"ERRORS: {s.errors}"
        if s.failure:
            status = "FAILED: " + s.failure.strip().splitlines()[0][:120]
        mode_cells = (
            f"| {_fmt_ratio(pt.requests_per_s if pt else None)} "
            f"| {_fmt_ratio(same.requests_per_s if same else None)} "
            f"| {_fmt_ratio(pt.p99_ms if pt else None)} "
            if modes
            else ""
        )
        lines.append(
            f"| {s.name} | {tls} | {m.requests_per_s:,.0f} "
            f"| {_fmt_ratio(r.requests_per_s if r else None)} {mode_cells}"
            f"| {m.p50_ms:.3f} | {_fmt_ratio(r.p50_ms if r else None)} "
            f"| {m.p99_ms:.3f} | {_fmt_ratio(r.p99_ms if r else None)} "
            f"| {m.peak_rss_kib / 1024:.1f} | {_fmt_ratio(r.peak_rss_kib if r else None)} "
            f"| {m.server_cpu_share:.0%} | {m.upstream_cpu_share:.0%} "
            f"| {m.other_cpu_share:.0%} | {m.wrk_cpu_share:.0%} | {status} |"
        )
    return "\n".join(lines)
