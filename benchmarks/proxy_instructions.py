"""What each mode of the proxy costs, counted in instructions: repeatable on a noisy machine.

Run: `python -m benchmarks.proxy_instructions [--targets a,b] [--duration S] [--connections N]`

The wall-clock benchmark (`scripts/bench`) is the one the issues' targets are stated in,
but on a shared virtual machine its rounds swing by a third or more, which hides a 5%
difference. This one runs each sidecar target under valgrind's callgrind with
instrumentation switched on only while wrk sends it a fixed workload, and reports the
proxy process's instructions per request: the same binary, configuration and requests
give the same count whatever else the machine is doing. Baselines in the same run: the
pass-through sidecar, and for the JWT modes the pass-through sent the same requests
(`sidecar-bearer`).

What the count leaves out, so read ratios as a second opinion, not as requests/s:
- the kernel's share (socket syscalls are a quarter of the pass-through's CPU time), so
  a mode's user-space cost weighs more here than in requests/s;
- memory stalls and cache misses;
- valgrind's CPU has no SHA or AES instructions, so hashing (token cache keys, the audit
  chain) counts several times what it costs on the real CPU;
- under valgrind the proxy runs ~50 times slower while the spool and audit writers flush
  on a wall-clock cadence, so their per-flush work is spread over far fewer requests.
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from benchmarks._machine import ToolMissing, ensure_tools, machine_info
from benchmarks._nginx import start_upstream
from benchmarks._probe import TargetFailed
from benchmarks._targets import (
    BenchContext,
    Placement,
    SidecarProxy,
    default_targets,
    select_targets,
    sidecar_command,
)
from benchmarks._tls import make_test_pki
from benchmarks._wrk import parse_wrk_report, run_wrk, wrk_argv
from lineage_sidecar.ports import free_port

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_TARGETS = (
    "sidecar",
    "sidecar-bearer",
    "sidecar-capture",
    "sidecar-jwt",
    "sidecar-jwt-policy",
    "sidecar-full",
)
START_TIMEOUT_S = 300.0
_TOTALS = re.compile(rb"^totals:\s*(\d+)", re.MULTILINE)


class TargetCount(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    requests: int
    instructions: int
    per_request: float
    vs_pass_through: float | None = None
    vs_same_requests: float | None = None


def callgrind_total(path: Path) -> int:
    """The instruction total callgrind wrote: its `totals:` lines, one per dump (the
    `summary:` line in the header is not the count when instrumentation starts off)."""
    totals = [int(m.group(1)) for m in _TOTALS.finditer(path.read_bytes())]
    if not totals:
        raise ValueError(f"{path}: no callgrind totals")
    return sum(totals)


def _valgrind_command(out_file: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_file}",
        sys.executable,
        *sidecar_command(),
    ]


def _instrument(pid: int, on: bool) -> None:
    subprocess.run(
        ["callgrind_control", "--instr=on" if on else "--instr=off", str(pid)],
        check=True,
        capture_output=True,
    )


def count(target: SidecarProxy, ctx: BenchContext, duration_s: float, connections: int) -> int:
    """Start the target under callgrind, load it, and return the requests it served."""
    target.start(ctx)
    try:
        url = target.url()
        argv = wrk_argv(
            url, connections=connections, duration_s=3, headers=target.headers,
            script=target.wrk_script,
        )  # fmt: skip
        run_wrk(argv, duration_s=3)  # warm-up: imports, caches, first JWKS use
        [pid] = target.pids()
        _instrument(pid, True)
        argv = wrk_argv(
            url, connections=connections, duration_s=duration_s, headers=target.headers,
            script=target.wrk_script, timeout_s=10.0,
        )  # fmt: skip
        report = parse_wrk_report(run_wrk(argv, duration_s=duration_s))
        _instrument(pid, False)
        if report.errors:
            raise TargetFailed(f"{target.name}: wrk saw {report.errors} errors")
        return report.requests
    finally:
        target.stop()  # callgrind writes its file as the process exits


def run(names: Sequence[str], duration_s: float, connections: int) -> list[TargetCount]:
    workdir = Path(tempfile.mkdtemp(prefix="lineage-instr-"))
    workdir.chmod(0o755)  # nginx workers drop root and must reach their prefix
    known = {t.name: t for t in default_targets()}
    counts: list[TargetCount] = []
    upstream = None
    try:
        port = free_port()
        upstream = start_upstream(workdir, None, port)
        ctx = BenchContext(
            workdir=workdir,
            pki=make_test_pki(workdir / "pki"),
            placement=Placement(client_cpu=None, server_cpu=None),
            upstream_port=port,
            upstream_pids=upstream.pids,
            load_s=duration_s + 3,
            connections=connections,
        )
        for name in names:
            template = known[name]
            if not isinstance(template, SidecarProxy):
                raise ValueError(f"{name} is not a sidecar target")
            out_file = workdir / f"callgrind.{name}.out"
            target = SidecarProxy(
                name=template.name, tls=template.tls, description=template.description,
                mode=template.mode, command=functools.partial(_valgrind_command, out_file),
                start_timeout_s=START_TIMEOUT_S,
            )  # fmt: skip
            started = time.monotonic()
            requests = count(target, ctx, duration_s, connections)
            instructions = callgrind_total(out_file)
            counts.append(
                TargetCount(
                    name=name,
                    description=template.description,
                    requests=requests,
                    instructions=instructions,
                    per_request=instructions / requests,
                )
            )
            print(
                f"instructions: {name:<20} {instructions / requests:>10,.0f} per request "
                f"({requests} requests, {time.monotonic() - started:.0f} s)",
                file=sys.stderr,
            )
    finally:
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return with_ratios(counts)


def with_ratios(counts: Sequence[TargetCount]) -> list[TargetCount]:
    by_name = {c.name: c for c in counts}

    def ratio(count: TargetCount, baseline: str) -> float | None:
        base = by_name.get(baseline)
        return round(count.per_request / base.per_request, 4) if base else None

    checks_tokens = {t.name for t in default_targets() if t.same_requests is not None}
    return [
        msgspec.structs.replace(
            c,
            vs_pass_through=ratio(c, "sidecar") if c.name != "sidecar" else None,
            vs_same_requests=ratio(c, "sidecar-bearer") if c.name in checks_tokens else None,
        )
        for c in counts
    ]


def markdown(counts: Sequence[TargetCount]) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}x"

    lines = [
        "| target | instructions per request | vs pass-through | vs same requests | requests |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {c.name} | {c.per_request:,.0f} | {cell(c.vs_pass_through)} "
        f"| {cell(c.vs_same_requests)} | {c.requests:,} |"
        for c in counts
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxy_instructions")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    parser.add_argument("--duration", type=float, default=20.0, help="instrumented seconds")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    names = select_targets(args.targets, [t.name for t in default_targets()])
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("instructions: valgrind is missing: apt-get install valgrind", file=sys.stderr)
        return 2
    try:
        ensure_tools()
    except ToolMissing as exc:
        print(f"instructions: {exc}", file=sys.stderr)
        return 2
    counts = run(names, args.duration, args.connections)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.results_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(counts)
    result = {"machine": machine_info(), "duration_s": args.duration, "targets": counts}
    (args.results_dir / f"instructions-{stamp}.json").write_bytes(msgspec.json.encode(result))
    (args.results_dir / f"instructions-{stamp}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
