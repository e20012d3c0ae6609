"""Paired proxy benchmark: what a mode costs, with both sides measured at the same time.

`scripts/bench` measures targets one after the other, and on a shared machine the speed
of the server core itself drifts between runs (the pass-through alone has ranged from
5,760 to 10,546 req/s between rounds of one run). A ratio of two such runs cannot tell 5%.

Here a pair (candidate, baseline) runs **concurrently**: both proxies (and the upstream)
on the server CPU, two wrk processes with the same workload on the client CPU, started
together. Whatever slows the core slows both sides in the same seconds. What each side
cost is read over the same window: its time on the CPU (every thread, from schedstat, in
nanoseconds) divided by the requests it completed; which side's wrk starts first
alternates between rounds. The figure of a round is the candidate's CPU per request over the
baseline's; the report gives the median over rounds and the spread. The requests/s ratio
of the round is kept too, but it is not the cost: the two sides share one core, and the
scheduler shares it by thread, so a side with a busy background thread (audit or spool
writer) gets a larger share.

The pair `sidecar-twin:sidecar` (two identical pass-through proxies) is the method's
own resolution: its ratios should be 1.00, and their spread is the noise left.

`--baseline-tree DIR` adds every sidecar target again as `NAME@base`, run from the code
in DIR: a change and the code before it, side by side in one run.

Usage: python -m benchmarks.proxy_paired [--pairs cand:base,...] [--starts N] [--rounds N]
       [--duration S] [--warmup S] [--connections N] [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import msgspec

from benchmarks._machine import ToolMissing, ensure_tools, loadavg, machine_info
from benchmarks._probe import TargetFailed
from benchmarks._procs import run_time_s, user_system_seconds
from benchmarks._targets import (
    BenchContext,
    Placement,
    SidecarProxy,
    Target,
    default_targets,
    sidecar_command,
)
from benchmarks._wrk import WrkReport, WrkReportError, parse_wrk_report, run_wrks, wrk_argv
from benchmarks.proxy import (
    RESULTS_DIR,
    bench_servers,
    choose_placement,
    interrupt,
    start_targets,
    stop_all,
)

SCHEMA = "lineage-sidecar/bench-proxy-paired/1"
TWIN = "sidecar-twin"
DEFAULT_PAIRS = (
    f"{TWIN}:sidecar",
    "sidecar-bearer:sidecar",
    "sidecar-jwt:sidecar",
    "sidecar-jwt:sidecar-bearer",
    "sidecar-jwt-policy:sidecar",
    "sidecar-capture:sidecar",
    "sidecar-full:sidecar",
)


class Side(msgspec.Struct, frozen=True, kw_only=True):
    """One proxy's share of a paired round."""

    requests: int
    duration_s: float
    cpu_s: float  # time on CPU of the proxy's threads during its wrk run (schedstat)
    # The same split into user and kernel time, from /proc/PID/stat (10 ms ticks).
    user_s: float = 0.0
    system_s: float = 0.0
    errors: int

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s * 1e6 / self.requests if self.requests else float("inf")

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


class PairRound(msgspec.Struct, frozen=True, kw_only=True):
    start: int  # which fresh start of the proxies
    round: int
    candidate: Side
    baseline: Side

    @property
    def cost_ratio(self) -> float:
        """Candidate's CPU per request over the baseline's: 1.05 means 5% more work."""
        return self.candidate.cpu_us_per_request / self.baseline.cpu_us_per_request

    @property
    def rps_ratio(self) -> float:
        return self.candidate.requests_per_s / self.baseline.requests_per_s


class PairSummary(msgspec.Struct, frozen=True, kw_only=True):
    candidate: str
    baseline: str
    rounds: list[PairRound]
    cost_ratio_median: float | None
    cost_ratio_quartiles: tuple[float, float] | None
    # The median of each fresh start of the proxies: how much one pair of processes differs.
    cost_ratio_by_start: list[float]
    rps_ratio_median: float | None
    candidate_cpu_us_median: float | None
    baseline_cpu_us_median: float | None
    errors: int
    failure: str | None = None


def parse_pairs(spec: str, known: Collection[str]) -> tuple[tuple[str, str], ...]:
    """`cand:base,cand:base` into pairs; ValueError names what is wrong."""
    pairs: list[tuple[str, str]] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        candidate, sep, baseline = item.partition(":")
        if not sep or not candidate or not baseline:
            raise ValueError(f"pair {item!r} is not CANDIDATE:BASELINE")
        if candidate == baseline:
            raise ValueError(f"pair {item!r} compares a target with itself; use {TWIN}")
        for name in (candidate, baseline):
            if name not in known:
                raise ValueError(f"unknown target {name!r} in pair {item!r}")
        if (candidate, baseline) not in pairs:
            pairs.append((candidate, baseline))
    if not pairs:
        raise ValueError("no pairs named")
    return tuple(pairs)


def summarise(candidate: str, baseline: str, rounds: Sequence[PairRound]) -> PairSummary:
    """Medians over rounds of the per-round ratios (a ratio of medians would mix rounds
    the machine ran at different speeds, which is what pairing is there to avoid)."""
    usable = [r for r in rounds if r.candidate.requests and r.baseline.requests]
    errors = sum(r.candidate.errors + r.baseline.errors for r in rounds)
    if not usable:
        return PairSummary(
            candidate=candidate, baseline=baseline, rounds=list(rounds), cost_ratio_median=None,
            cost_ratio_quartiles=None, cost_ratio_by_start=[], rps_ratio_median=None,
            candidate_cpu_us_median=None, baseline_cpu_us_median=None, errors=errors,
        )  # fmt: skip
    costs = [r.cost_ratio for r in usable]
    quartiles = statistics.quantiles(costs, n=4) if len(costs) > 1 else [costs[0]] * 3
    starts = sorted({r.start for r in usable})
    by_start = [
        round(statistics.median(r.cost_ratio for r in usable if r.start == start), 4)
        for start in starts
    ]
    return PairSummary(
        candidate=candidate,
        baseline=baseline,
        rounds=list(rounds),
        cost_ratio_median=round(statistics.median(costs), 4),
        cost_ratio_quartiles=(round(quartiles[0], 4), round(quartiles[2], 4)),
        cost_ratio_by_start=by_start,
        rps_ratio_median=round(statistics.median(r.rps_ratio for r in usable), 4),
        candidate_cpu_us_median=round(
            statistics.median(r.candidate.cpu_us_per_request for r in usable), 2
        ),
        baseline_cpu_us_median=round(
            statistics.median(r.baseline.cpu_us_per_request for r in usable), 2
        ),
        errors=errors,
    )


def markdown_table(summaries: Sequence[PairSummary]) -> str:
    lines = [
        "| candidate | baseline | CPU/request ratio (median) | middle half of rounds "
        "| median of each start | candidate CPU µs/req | baseline CPU µs/req | req/s ratio "
        "| rounds | errors |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        if s.cost_ratio_median is None or s.cost_ratio_quartiles is None:
            lines.append(
                f"| {s.candidate} | {s.baseline} | FAILED: "
                f"{(s.failure or 'no data').strip().splitlines()[0][:100]} |  |  |  |  |  |  |  |"
            )
            continue
        low, high = s.cost_ratio_quartiles
        lines.append(
            f"| {s.candidate} | {s.baseline} | {s.cost_ratio_median:.3f}x "
            f"| {low:.3f}x - {high:.3f}x "
            f"| {', '.join(f'{value:.3f}x' for value in s.cost_ratio_by_start)} "
            f"| {s.candidate_cpu_us_median:.1f} "
            f"| {s.baseline_cpu_us_median:.1f} | {s.rps_ratio_median:.3f}x "
            f"| {len(s.rounds)} | {s.errors} |"
        )
    return "\n".join(lines)


# -- IO --


def _say(message: str) -> None:
    print(f"bench-paired: {message}", file=sys.stderr, flush=True)


def _argv(target: Target, ctx: BenchContext, args: argparse.Namespace, seconds: float) -> list[str]:
    return wrk_argv(
        target.url(), connections=args.connections, duration_s=seconds, headers=target.headers,
        timeout_s=2.0, cpu=ctx.placement.client_cpu, script=target.wrk_script,
    )  # fmt: skip


def measure_pair(
    candidate: Target,
    baseline: Target,
    ctx: BenchContext,
    args: argparse.Namespace,
    start: int,
    number: int,
) -> PairRound:
    """Warm both up together, then one concurrent measured run of both."""
    # Odd rounds start the candidate's wrk first, even rounds the baseline's.
    pair = (candidate, baseline) if number % 2 else (baseline, candidate)
    if args.warmup > 0:
        run_wrks([_argv(t, ctx, args, args.warmup) for t in pair], duration_s=args.warmup)
    before = [(run_time_s(t.pids()), user_system_seconds(t.pids())) for t in pair]
    outputs = run_wrks([_argv(t, ctx, args, args.duration) for t in pair], duration_s=args.duration)
    after = [(run_time_s(t.pids()), user_system_seconds(t.pids())) for t in pair]
    reports: list[WrkReport] = [parse_wrk_report(text) for text in outputs]
    sides = [
        Side(
            requests=report.requests,
            duration_s=report.duration_s,
            cpu_s=round(cpu1 - cpu0, 6),
            user_s=round(split1[0] - split0[0], 2),
            system_s=round(split1[1] - split0[1], 2),
            errors=report.errors,
        )
        for report, (cpu0, split0), (cpu1, split1) in zip(reports, before, after, strict=True)
    ]
    if pair[0] is baseline:
        sides.reverse()
    return PairRound(start=start, round=number, candidate=sides[0], baseline=sides[1])


def run(
    args: argparse.Namespace,
    pairs: Sequence[tuple[str, str]],
    known: dict[str, Target],
    placement: Placement,
    workdir: Path,
) -> list[PairSummary]:
    """Every pair, `args.rounds` times in each of `args.starts` fresh starts of the
    proxies: two processes of one program differ by a percent or two (hash seeds, memory
    layout, the order they were started in), so each start draws that difference anew
    instead of keeping one draw."""
    names = {name for pair in pairs for name in pair}
    targets = [target for name, target in known.items() if name in names]
    rounds: dict[tuple[str, str], list[PairRound]] = {pair: [] for pair in pairs}
    failures: dict[tuple[str, str], str] = {}
    load_s = args.starts * args.rounds * len(pairs) * (args.warmup + args.duration)
    with bench_servers(workdir, placement, load_s=load_s, connections=args.connections) as (
        ctx,
        _upstream,
        started,
    ):
        for start in range(1, args.starts + 1):
            # The process started first measured 1-2% more CPU per request than an
            # identical one started last, whichever it was: odd starts go in list order,
            # even starts in reverse, so that bias cancels over the starts.
            order = targets if start % 2 else targets[::-1]
            _verified, failed = start_targets(order, ctx, started)
            for number in range(1, args.rounds + 1):
                for pair in pairs:
                    if pair in failures:
                        continue
                    broken = [name for name in pair if name in failed]
                    if broken:
                        failures[pair] = f"{broken[0]} did not start: {failed[broken[0]]}"
                        continue
                    try:
                        result = measure_pair(
                            known[pair[0]], known[pair[1]], ctx, args, start, number
                        )
                    except WrkReportError as exc:
                        failures[pair] = f"start {start} round {number}: {exc}"
                        _say(f"{pair[0]}:{pair[1]} start {start} round {number} FAILED: {exc}")
                        continue
                    rounds[pair].append(result)
                    _say(
                        f"start {start}/{args.starts} round {number}/{args.rounds} "
                        f"{pair[0]:>18} vs {pair[1]:<15} "
                        f"CPU/request {result.cost_ratio:.3f}x  req/s {result.rps_ratio:.3f}x  "
                        f"({result.candidate.cpu_us_per_request:.1f} vs "
                        f"{result.baseline.cpu_us_per_request:.1f} µs; kernel "
                        f"{_kernel_share(result.candidate):.0%} vs "
                        f"{_kernel_share(result.baseline):.0%})"
                    )
            stop_all(started)
    return [
        msgspec.structs.replace(summarise(c, b, rounds[(c, b)]), failure=failures.get((c, b)))
        for c, b in pairs
    ]


def _kernel_share(side: Side) -> float:
    total = side.user_s + side.system_s
    return side.system_s / total if total else 0.0


def _targets(baseline_tree: Path | None = None) -> list[Target]:
    """Every benchmark target, the twin, and with `baseline_tree` each sidecar target
    again as `NAME@base`, run from the code in that directory (before/after a change)."""
    targets = default_targets()
    sidecar = next(t for t in targets if t.name == "sidecar")
    assert isinstance(sidecar, SidecarProxy)
    twin = dataclasses.replace(sidecar, name=TWIN, description="a second pass-through sidecar")
    extra: list[Target] = [twin]
    if baseline_tree is not None:
        command = _command_from(baseline_tree)
        extra += [
            dataclasses.replace(
                t,
                name=f"{t.name}@base",
                description=f"{t.description}, code of {baseline_tree}",
                command=command,
            )
            for t in targets
            if isinstance(t, SidecarProxy) and t.command is sidecar_command
        ]
    return [*targets, *extra]


def _command_from(tree: Path) -> Callable[[], list[str]]:
    """`lineage-sidecar proxy` with the packages of `tree` first on the import path.

    First means before the working directory too: `python -c` puts it at sys.path[0], and
    run from a checkout, the checkout's own packages would win over PYTHONPATH.
    """
    launcher = (
        f"import sys; sys.path.insert(0, {str(tree)!r}); "
        "from lineage_sidecar.cli import main; sys.exit(main())"
    )

    def command() -> list[str]:
        return ["env", f"PYTHONPATH={tree}", sys.executable, "-c", launcher, "proxy"]

    return command


def main(argv: Sequence[str] | None = None) -> int:
    # The target names depend on --baseline-tree, and --pairs is checked against them.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--baseline-tree", type=Path, default=None)
    baseline_tree = pre.parse_known_args(argv)[0].baseline_tree
    known = {t.name: t for t in _targets(baseline_tree and baseline_tree.resolve())}
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.proxy_paired",
        description="What each mode costs, measured concurrently with its baseline.",
    )
    parser.add_argument("--pairs", default=",".join(DEFAULT_PAIRS), help="CANDIDATE:BASELINE,...")
    parser.add_argument(
        "--starts", type=int, default=4, help="fresh starts, in alternating order (4)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="paired rounds per start (4)")
    parser.add_argument("--duration", type=int, default=4, help="whole seconds per run (4)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="whole seconds before each run (1; wrk takes whole seconds)",
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk connections per side")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        default=None,
        help="a checkout of other code (e.g. git worktree add /tmp/base HEAD~1): each sidecar "
        "target is also known as NAME@base, run from it, for pairs such as "
        "sidecar-capture:sidecar-capture@base",
    )
    args = parser.parse_args(argv)
    try:
        pairs = parse_pairs(args.pairs, known)
    except ValueError as exc:
        parser.error(f"{exc}; known targets: {', '.join(known)}")
    if (
        args.starts < 1
        or args.rounds < 1
        or args.duration <= 0
        or args.warmup < 0
        or args.connections < 1
    ):
        parser.error(
            "--starts, --rounds and --connections must be >= 1, --duration > 0, --warmup >= 0"
        )
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    try:
        installed = ensure_tools()
    except ToolMissing as exc:
        _say(str(exc))
        return 2
    started_at = datetime.datetime.now(datetime.UTC)
    machine = machine_info()
    placement = choose_placement(None, None)
    if placement.client_cpu is not None:
        os.sched_setaffinity(0, {placement.client_cpu})
    workdir = Path(tempfile.mkdtemp(prefix="lineage-bench-paired-"))
    workdir.chmod(0o755)  # nginx workers drop root and must reach their prefix
    try:
        summaries = run(args, pairs, known, placement, workdir)
    except KeyboardInterrupt:
        _say("interrupted; all servers stopped")
        return 130
    except TargetFailed as exc:
        _say(f"aborted: {exc}")
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    table = markdown_table(summaries)
    markdown = (
        f"## Paired proxy benchmark, {stamp}\n\n"
        f"Each pair ran concurrently: both proxies and the upstream on one CPU, one wrk per "
        f"side ({args.connections} connections, {args.duration:g} s after {args.warmup:g} s "
        f"warm-up) on the other. {placement.describe()}. CPU/request ratio: the "
        f"candidate's CPU time per completed request over the baseline's, in the same "
        f"seconds; median and middle half over all rounds ({args.rounds} in each of "
        f"{args.starts} fresh starts of the proxies), and the median of each start. "
        f"`{TWIN}:sidecar` compares two identical proxies: the method's own noise.\n\n"
        f"{table}\n"
    )
    report = {
        "schema": SCHEMA,
        "started_at": started_at.isoformat(timespec="seconds"),
        "command": [
            "python",
            "-m",
            "benchmarks.proxy_paired",
            *(sys.argv[1:] if argv is None else argv),
        ],
        "machine": {**machine, "loadavg_at_end": loadavg(), "packages_installed": installed},
        "parameters": {
            "starts": args.starts,
            "rounds_per_start": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections_per_side": args.connections,
            "placement": placement.describe(),
        },
        "pairs": summaries,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.results_dir / f"paired-{stamp}.json"
    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
    (args.results_dir / f"paired-{stamp}.md").write_text(markdown)
    print(markdown)
    _say(f"results: {json_path} (+ .md)")
    return 0 if all(s.failure is None and s.errors == 0 for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
