"""Proxy benchmark: the upstream, nginx and the sidecar proxy under one wrk workload.

One run starts a fixed-response upstream (nginx, 1 worker), every selected target in
front of it, checks that each answers 200 with the upstream's exact body, then measures
them with wrk in interleaved rounds (a, b, c, a, b, c, ...) so slow drifts of a shared
machine hit all targets alike. wrk runs on one CPU, all servers on the other. The
result is a JSON file with every raw figure and a markdown table of medians and ratios
to nginx (and, for the sidecar's authentication, policy and capture modes, to the
pass-through sidecar), in benchmarks/results/. All servers are stopped at the end, also on Ctrl-C.

Usage: scripts/bench [--quick] [--targets upstream,nginx,...] [--rounds N] ...
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import resource
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import msgspec

from benchmarks._machine import ToolMissing, ensure_tools, loadavg, machine_info
from benchmarks._nginx import UPSTREAM_BODY, NginxInstance, start_upstream
from benchmarks._probe import TargetFailed, Verification
from benchmarks._procs import core_times, cpu_seconds, peak_rss_kib
from benchmarks._report import (
    RoundResult,
    TargetSummary,
    markdown_table,
    medians_of,
    with_ratios,
)
from benchmarks._targets import (
    DEFAULT,
    TARGET_SETS,
    BenchContext,
    Placement,
    Target,
    default_targets,
    select_targets,
    verify,
)
from benchmarks._tls import make_test_pki
from benchmarks._wrk import WrkReportError, parse_wrk_report, run_wrk, wrk_argv
from lineage_sidecar.ports import free_port

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA = "lineage-sidecar/bench-proxy/1"
# Above this share of the server core taken by other processes, the run is flagged noisy.
NOISY_OTHER_CPU = 0.10


@dataclass(frozen=True)
class Parameters:
    """The workload, identical for every target of a run."""

    duration_s: float
    warmup_s: float
    connections: int
    rounds: int
    wrk_timeout_s: float
    targets: tuple[str, ...]


def parse_args(argv: Sequence[str] | None) -> tuple[Parameters, argparse.Namespace]:
    known = [t.name for t in default_targets()]
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Measure the upstream, nginx and the sidecar proxy with wrk.",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each run (2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--timeout", type=float, default=2.0, help="wrk request timeout (2)")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT),
        help=f"comma-separated names or sets ({', '.join([*TARGET_SETS, 'all'])}); "
        f"known: {', '.join(known)} (default: {','.join(DEFAULT)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 2 s runs, 1 s warm-up, 1 round"
    )
    parser.add_argument("--client-cpu", type=int, default=None, help="CPU for wrk")
    parser.add_argument("--server-cpu", type=int, default=None, help="CPU for the servers")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep configs and logs of the servers"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.rounds = 2.0, 1.0, 1
    try:
        names = select_targets(args.targets, known)
    except ValueError as exc:
        parser.error(f"{exc}; known: {', '.join(known)}; sets: {', '.join(TARGET_SETS)}, all")
    if args.duration <= 0 or args.warmup < 0 or args.rounds < 1 or args.connections < 1:
        parser.error("--duration and --connections must be > 0, --rounds >= 1, --warmup >= 0")
    return (
        Parameters(
            duration_s=args.duration,
            warmup_s=args.warmup,
            connections=args.connections,
            rounds=args.rounds,
            wrk_timeout_s=args.timeout,
            targets=names,
        ),
        args,
    )


def choose_placement(client_cpu: int | None, server_cpu: int | None) -> Placement:
    """Client on the first available CPU, servers on the second, unless told otherwise."""
    cpus = sorted(os.sched_getaffinity(0))
    for given in (client_cpu, server_cpu):
        if given is not None and given not in cpus:
            raise SystemExit(f"scripts/bench: CPU {given} is not available (have {cpus})")
    if client_cpu is not None and client_cpu == server_cpu:
        raise SystemExit("scripts/bench: --client-cpu and --server-cpu must differ")
    if len(cpus) < 2:
        return Placement(None, None)
    client = client_cpu if client_cpu is not None else next(c for c in cpus if c != server_cpu)
    server = server_cpu if server_cpu is not None else next(c for c in cpus if c != client)
    return Placement(client, server)


def interrupt(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM/SIGHUP take the same path as Ctrl-C, through every `finally` that stops servers.
    raise KeyboardInterrupt(f"signal {signum}")


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def measure_round(
    target: Target, ctx: BenchContext, params: Parameters, round_no: int
) -> RoundResult:
    """Warm up, then one measured wrk run, with the server's memory and CPU around it."""
    cpu = ctx.placement.client_cpu
    url = target.url()
    if params.warmup_s > 0:
        run_wrk(
            wrk_argv(url, connections=params.connections, duration_s=params.warmup_s,
                     headers=target.headers, timeout_s=params.wrk_timeout_s, cpu=cpu,
                     script=target.wrk_script),
            duration_s=params.warmup_s,
        )  # fmt: skip
    server_pids, upstream_pids = target.pids(), ctx.upstream_pids()
    load_before = loadavg()
    server_cpu0, upstream_cpu0 = cpu_seconds(server_pids), cpu_seconds(upstream_pids)
    server_core0 = core_times(ctx.placement.server_cpu)
    # wrk is the only child reaped during the run, so the children's rusage delta is wrk's.
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    started_at = _utc_now().isoformat(timespec="seconds")
    output = run_wrk(
        wrk_argv(url, connections=params.connections, duration_s=params.duration_s,
                 headers=target.headers, timeout_s=params.wrk_timeout_s, cpu=cpu,
                 script=target.wrk_script),
        duration_s=params.duration_s,
    )  # fmt: skip
    server_core1 = core_times(ctx.placement.server_cpu)
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu_s = (children1.ru_utime + children1.ru_stime) - (
        children0.ru_utime + children0.ru_stime
    )
    server_cpu_s = cpu_seconds(server_pids) - server_cpu0
    upstream_cpu_s = cpu_seconds(upstream_pids) - upstream_cpu0
    # For the upstream-direct target the server is the upstream: count it once.
    ours_s = server_cpu_s + (0.0 if server_pids == upstream_pids else upstream_cpu_s)
    return RoundResult(
        round=round_no,
        started_at=started_at,
        wrk=parse_wrk_report(output),
        wrk_output=output,
        peak_rss_kib=peak_rss_kib(server_pids),
        server_cpu_s=round(server_cpu_s, 3),
        upstream_cpu_s=round(upstream_cpu_s, 3),
        other_cpu_on_server_core_s=round(
            max(0.0, server_core1.tasks_s - server_core0.tasks_s - ours_s), 3
        ),
        interrupts_on_server_core_s=round(server_core1.interrupts_s - server_core0.interrupts_s, 3),
        wrk_cpu_s=round(wrk_cpu_s, 3),
        loadavg_before=load_before,
        loadavg_after=loadavg(),
    )


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def start_targets(
    targets: Sequence[Target], ctx: BenchContext, started: list[Target]
) -> tuple[dict[str, Verification], dict[str, str]]:
    """Start and check each target; returns the checks passed and the failures by name.

    Each target is appended to `started` before it starts, so that the caller stops
    even one that failed halfway.
    """
    verifications: dict[str, Verification] = {}
    failures: dict[str, str] = {}
    for target in targets:
        started.append(target)
        try:
            target.start(ctx)
            try:
                verifications[target.name] = verify(target, ctx.pki)
            except TargetFailed as exc:
                raise TargetFailed(target.failure_report(str(exc))) from exc
            _say(f"{target.name} ready at {target.url()}")
        except TargetFailed as exc:
            failures[target.name] = str(exc)
            _say(f"{target.name} FAILED to start:\n{exc}")
            target.stop()
    return verifications, failures


@contextlib.contextmanager
def bench_servers(
    workdir: Path, placement: Placement, *, load_s: float, connections: int
) -> Iterator[tuple[BenchContext, NginxInstance, list[Target]]]:
    """The upstream and the context targets start in; on the way out, every target in the
    yielded list (the caller appends each one before starting it) and the upstream are
    stopped, also on Ctrl-C or an error."""
    upstream: NginxInstance | None = None
    started: list[Target] = []
    try:
        upstream_port = free_port()
        upstream = start_upstream(workdir, placement.server_cpu, upstream_port)
        ctx = BenchContext(
            workdir=workdir,
            pki=make_test_pki(workdir / "pki"),
            placement=placement,
            upstream_port=upstream_port,
            upstream_pids=upstream.pids,
            load_s=load_s,
            connections=connections,
        )
        yield ctx, upstream, started
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave servers behind.
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in _STOP_SIGNALS}
        try:
            stop_all(started)
            if upstream is not None:
                upstream.stop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def stop_all(started: list[Target]) -> None:
    """Stop the targets, last started first, and empty the list."""
    while started:
        started.pop().stop()


def run_benchmark(params: Parameters, placement: Placement, workdir: Path) -> list[TargetSummary]:
    """Start everything, measure every round, stop everything; summaries per target."""
    targets = [t for t in default_targets() if t.name in params.targets]
    targets.sort(key=lambda t: params.targets.index(t.name))
    rounds: dict[str, list[RoundResult]] = {t.name: [] for t in targets}
    urls: dict[str, str] = {}
    load_s = params.rounds * (params.warmup_s + params.duration_s)
    with bench_servers(workdir, placement, load_s=load_s, connections=params.connections) as (
        ctx,
        upstream,
        started,
    ):
        verifications, failures = start_targets(targets, ctx, started)
        urls = {t.name: t.url() for t in targets if t.name in verifications}
        for round_no in range(1, params.rounds + 1):
            for target in targets:
                if target.name in failures:
                    continue
                if not upstream.running():
                    raise TargetFailed(upstream.failure_report("the upstream died"))
                try:
                    result = measure_round(target, ctx, params, round_no)
                except WrkReportError as exc:
                    failures[target.name] = f"round {round_no}: {exc}"
                    _say(f"{target.name} round {round_no} FAILED: {exc}")
                    continue
                rounds[target.name].append(result)
                wrk = result.wrk
                _say(
                    f"round {round_no}/{params.rounds} {target.name:<15} "
                    f"{wrk.requests_per_s:>10,.0f} req/s  p50 {wrk.p50_ms:.3f} ms  "
                    f"p99 {wrk.p99_ms:.3f} ms  errors {wrk.errors}  load {result.loadavg_after}"
                )
                if wrk.rotated_tokens is not None:
                    _say(f"round {round_no}/{params.rounds} {target.name}: {wrk.rotated_tokens}")
                if not target.running():
                    failures[target.name] = target.failure_report(f"exited during round {round_no}")
                    _say(failures[target.name])
    return summarise(targets, rounds, failures, verifications, urls)


def summarise(
    targets: Sequence[Target],
    rounds: dict[str, list[RoundResult]],
    failures: dict[str, str],
    verifications: dict[str, Verification],
    urls: dict[str, str],
) -> list[TargetSummary]:
    summaries = []
    for target in targets:
        target_rounds = rounds[target.name]
        errors = sum(r.wrk.errors for r in target_rounds)
        failure = failures.get(target.name)
        summaries.append(
            TargetSummary(
                name=target.name,
                description=target.description,
                tls=target.tls,
                compare_to=target.compare_to,
                pass_through=target.pass_through,
                same_requests=target.same_requests,
                url=urls.get(target.name),
                status="failed" if failure else ("errors" if errors else "ok"),
                failure=failure,
                verification=verifications.get(target.name),
                rounds=target_rounds,
                errors=errors,
                medians=medians_of(target_rounds),
                ratios=None,
            )
        )
    return with_ratios(summaries)


def render_markdown(
    summaries: Sequence[TargetSummary],
    params: Parameters,
    placement: Placement,
    machine: dict[str, object],
    started_at: str,
) -> str:
    versions = machine.get("versions", {})
    version_text = (
        ", ".join(f"{name} {value}" for name, value in versions.items())
        if isinstance(versions, dict)
        else str(versions)
    )
    lines = [
        f"## Proxy benchmark, {started_at}",
        "",
        f"wrk: 1 thread, {params.connections} connections, {params.duration_s:g} s per run "
        f"after {params.warmup_s:g} s warm-up, median of {params.rounds} interleaved "
        f"round(s); GET / answered by the upstream with {len(UPSTREAM_BODY)} bytes of JSON.",
        f"CPU placement: {placement.describe()}.",
        f"Machine: {machine.get('nproc')} CPUs ({machine.get('cpu_model')}), kernel "
        f"{machine.get('kernel')}, load at start {machine.get('loadavg_at_start')}; "
        f"versions: {version_text}.",
        "",
        markdown_table(summaries),
        "",
        "vs nginx: ratio to the nginx row of the same TLS mode (req/s: higher is better; "
        "latency and RSS: lower is better). vs pass-through (modes only): the same to the "
        "pass-through sidecar of the same TLS mode, i.e. what the mode itself costs. "
        "server CPU: CPU time of the system under test per second of the run "
        "(100% = one full core); upstream CPU: the same for the upstream, "
        "which shares that core; other CPU: time other processes (or the hypervisor) "
        "took of the server core: noise, compare rows only when it is low; "
        "wrk CPU: CPU share of wrk itself (near 100%: wrk, not the target, is the limit).",
        "",
    ]
    others = [s.medians.other_cpu_share for s in summaries if s.medians is not None]
    if others and max(others) > NOISY_OTHER_CPU:
        lines += [
            f"**Noisy run:** other processes took up to {max(others):.0%} of the server CPU "
            "while targets were measured; rows are not comparable. Repeat on a quiet machine.",
            "",
        ]
    for s in summaries:
        lines.append(f"- **{s.name}**: {s.description}")
    problems = [s for s in summaries if s.status != "ok"]
    if problems:
        lines.append("")
        lines.append("Problems:")
        for s in problems:
            detail = s.failure or f"{s.errors} wrk errors (socket errors or non-2xx/3xx)"
            lines.append(f"- {s.name}: {detail.strip().splitlines()[0]}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    params, args = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    try:
        return _run(params, args, argv)
    except KeyboardInterrupt:
        _say("interrupted; all servers stopped")
        return 130


def _run(params: Parameters, args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    try:
        installed = ensure_tools()
    except ToolMissing as exc:
        _say(str(exc))
        return 2
    placement = choose_placement(args.client_cpu, args.server_cpu)
    started_at = _utc_now()
    machine = machine_info()
    if placement.client_cpu is not None:
        # The harness itself idles next to wrk, away from the servers' CPU.
        os.sched_setaffinity(0, {placement.client_cpu})
    _say(f"targets: {', '.join(params.targets)}; {placement.describe()}")

    workdir = Path(tempfile.mkdtemp(prefix="lineage-bench-"))
    # nginx workers drop root privileges and must be able to reach their prefix dirs.
    workdir.chmod(0o755)
    try:
        summaries = run_benchmark(params, placement, workdir)
    except TargetFailed as exc:
        _say(f"aborted: {exc}")
        return 1
    finally:
        if args.keep_workdir:
            _say(f"server configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    markdown = render_markdown(summaries, params, placement, machine, stamp)
    report = {
        "schema": SCHEMA,
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": _utc_now().isoformat(timespec="seconds"),
        "command": ["scripts/bench", *(sys.argv[1:] if argv is None else argv)],
        "machine": {**machine, "loadavg_at_end": loadavg(), "packages_installed": installed},
        "parameters": {
            "duration_s": params.duration_s,
            "warmup_s": params.warmup_s,
            "connections": params.connections,
            "threads": 1,
            "rounds": params.rounds,
            "wrk_timeout_s": params.wrk_timeout_s,
            "targets": list(params.targets),
            "request": {"method": "GET", "path": "/", "response_bytes": len(UPSTREAM_BODY)},
            "placement": {
                "client_cpu": placement.client_cpu,
                "server_cpu": placement.server_cpu,
                "description": placement.describe(),
            },
            "statistic": "median over rounds (peak RSS: max over rounds)",
        },
        "targets": summaries,
    }
    results_dir: Path = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"proxy-{stamp}.json"
    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
    (results_dir / f"proxy-{stamp}.md").write_text(markdown)
    print(markdown)
    _say(f"results: {json_path} (+ .md)")
    return 0 if all(s.status == "ok" for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
