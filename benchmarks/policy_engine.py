"""Policy engine micro benchmark: pycasbin's enforcer and the compiled engine side by side.

Run: `.venv/bin/python -m benchmarks.policy_engine [--quick]`

Both engines get the same model (RBAC, keyMatch2 objects, `r.act == p.act`) and the same
policy: N rules (200 and 10,000) spread over 1,000 roles that inherit from one another in
a tree (so a user's roles include their ancestors), and users holding three roles each.
The request measured is allowed by the **last** rule of the file, which is pycasbin's worst
case since it tests rules in file order. Per decision the time is taken with
`time.perf_counter_ns` around one call (about 0.1 µs of that is the clock itself); p50 and
p99 are computed per round and the median over rounds is reported, because the machine is
shared and single rounds are noisy. "cold" decisions use a different user every time, so
the engine computes that user's role closure instead of finding it cached.

Build time is `PolicyEngine.from_text` on the policy text (CSV parsing included), which is
what a reload does, against pycasbin building an `Enforcer` from the same text.

Writes `benchmarks/results/policy_engine.json` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import casbin
from casbin.persist.adapter import Adapter, load_policy_line

from proxy.authz.engine import PolicyEngine

ROLES = 1_000
USERS = 5_000
RESULTS = Path(__file__).parent / "results" / "policy_engine.json"
TARGET_P99_US = 20.0
TARGET_RELOAD_S = 1.0

MODEL = """
[request_definition]
r = sub, obj, act

[policy_definition]
p = sub, obj, act

[role_definition]
g = _, _

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = g(r.sub, p.sub) && keyMatch2(r.obj, p.obj) && r.act == p.act
"""


def policy_text(rules: int) -> str:
    """`rules` p lines over ROLES roles, a role tree, and USERS users with 3 roles each."""
    lines = []
    for i in range(rules):
        action = "read" if i % 3 else "write"
        lines.append(f"p, role{i % ROLES}, /datasets/d{i}/tables/:table, {action}")
    # Role j inherits role (j - 1) // 8: a tree about four levels deep.
    lines.extend(f"g, role{j}, role{(j - 1) // 8}" for j in range(1, ROLES))
    for u in range(USERS):
        lines.extend(f"g, user{u}, role{(u * 7 + k * 131) % ROLES}" for k in range(3))
    # The measured user holds the role of the last rule (and two others).
    last_role = (rules - 1) % ROLES
    lines.extend(f"g, alice, role{r}" for r in (last_role, (last_role + 1) % ROLES, 5))
    return "\n".join(lines)


def last_rule_request(rules: int) -> tuple[str, str, str]:
    action = "read" if (rules - 1) % 3 else "write"
    return ("alice", f"/datasets/d{rules - 1}/tables/sales", action)


class _TextAdapter(Adapter):  # type: ignore[misc]  # casbin is untyped
    def __init__(self, text: str) -> None:
        self._text = text

    def load_policy(self, model: Any) -> None:
        for line in self._text.split("\n"):
            load_policy_line(line.strip(), model)


def casbin_enforcer(text: str) -> Any:
    return casbin.Enforcer(casbin.Enforcer.new_model(text=MODEL), _TextAdapter(text))


def per_call_ns(call: Callable[[], object], iterations: int) -> list[int]:
    samples = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        start = clock()
        call()
        samples.append(clock() - start)
    return samples


def percentile(samples: list[int], fraction: float) -> float:
    ordered = sorted(samples)
    return float(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))])


def rounds_summary(rounds: list[list[int]]) -> dict[str, float]:
    """Median over rounds of each round's p50 and p99, in microseconds."""
    return {
        "p50_us": statistics.median(percentile(r, 0.50) for r in rounds) / 1000,
        "p99_us": statistics.median(percentile(r, 0.99) for r in rounds) / 1000,
        "rounds": len(rounds),
        "decisions_per_round": len(rounds[0]),
    }


def cold_decisions(engine: PolicyEngine, request: tuple[str, str, str]) -> list[int]:
    """Each user once, on a new engine: role closures and the patterns the user's rules
    need are computed on first use, as right after a reload."""
    users = iter(range(USERS))
    return per_call_ns(lambda: engine.decide(f"user{next(users)}", request[1], request[2]), USERS)


def measure(rules: int, rounds: int, quick: bool) -> dict[str, Any]:
    text = policy_text(rules)
    request = last_rule_request(rules)
    enforcer = casbin_enforcer(text)
    engine = PolicyEngine.from_text(MODEL, text, policy_source="bench.csv")
    assert engine.mode == "compiled", engine.fallback_reason
    assert enforcer.enforce(*request) is True
    decision = engine.decide(*request)
    assert decision.allowed, decision
    assert decision.source == f"bench.csv:{rules}", decision

    # pycasbin is slow at 10,000 rules (tens of ms a decision): fewer iterations.
    casbin_iterations = max(5, min(2_000, 400_000 // rules)) // (4 if quick else 1)
    fast_iterations = 2_000 if quick else 20_000
    casbin_rounds = [
        per_call_ns(lambda: enforcer.enforce(*request), casbin_iterations) for _ in range(rounds)
    ]
    fast_rounds = [
        per_call_ns(lambda: engine.decide(*request), fast_iterations) for _ in range(rounds)
    ]

    cold_rounds = [
        cold_decisions(PolicyEngine.from_text(MODEL, text), request) for _ in range(rounds)
    ]
    return {
        "rules": rules,
        "roles": ROLES,
        "request": list(request),
        "pycasbin": rounds_summary(casbin_rounds),
        "compiled_warm": rounds_summary(fast_rounds),
        "compiled_cold_closure": rounds_summary(cold_rounds),
    }


def measure_build(rules: int, rounds: int) -> dict[str, Any]:
    text = policy_text(rules)
    compiled_s = []
    warm_s = []
    casbin_s = []
    for _ in range(rounds):
        start = time.perf_counter()
        engine = PolicyEngine.from_text(MODEL, text)
        compiled_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.warm()
        warm_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        casbin_enforcer(text)
        casbin_s.append(time.perf_counter() - start)
    return {
        "rules": rules,
        "policy_lines": text.count("\n") + 1,
        "compiled_build_s": statistics.median(compiled_s),
        "compiled_build_s_all": compiled_s,
        "compiled_warm_s": statistics.median(warm_s),
        "pycasbin_build_s": statistics.median(casbin_s),
        "pycasbin_build_s_all": casbin_s,
    }


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def markdown(decisions: list[dict[str, Any]], build: dict[str, Any]) -> str:
    rows = [
        "| rules | roles | engine | p50 µs | p99 µs | decisions x rounds |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for result in decisions:
        for key, label in (
            ("pycasbin", "pycasbin Enforcer"),
            ("compiled_warm", "compiled (closure cached)"),
            ("compiled_cold_closure", "compiled (new user each call)"),
        ):
            figures = result[key]
            rows.append(
                f"| {result['rules']:,} | {result['roles']:,} | {label} | {figures['p50_us']:,.1f} "
                f"| {figures['p99_us']:,.1f} "
                f"| {figures['decisions_per_round']:,} x {figures['rounds']} |"
            )
    largest = decisions[-1]
    p99 = largest["compiled_warm"]["p99_us"]
    speedup = largest["pycasbin"]["p50_us"] / largest["compiled_warm"]["p50_us"]
    rows += [
        "",
        f"Build from text, {build['rules']:,} rules ({build['policy_lines']:,} lines): compiled "
        f"{build['compiled_build_s']:.3f} s, pycasbin {build['pycasbin_build_s']:.3f} s (median); "
        f"compiling the deferred patterns (`warm()`, off the hot path) "
        f"{build['compiled_warm_s']:.3f} s more.",
        "",
        f"Targets at {largest['rules']:,} rules: p99 decision < {TARGET_P99_US:g} µs: "
        f"{'met' if p99 < TARGET_P99_US else 'NOT met'} ({p99:.1f} µs); "
        f"reload < {TARGET_RELOAD_S:g} s: "
        f"{'met' if build['compiled_build_s'] < TARGET_RELOAD_S else 'NOT met'} "
        f"({build['compiled_build_s']:.3f} s). p50 speed-up over pycasbin: {speedup:,.0f} times.",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer iterations and rounds")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per measurement (5)")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds

    load_before = loadavg()
    decisions = [measure(rules, rounds, args.quick) for rules in (200, 10_000)]
    build = measure_build(10_000, rounds)
    result = {
        "benchmark": "policy_engine",
        "started_load_average": load_before,
        "finished_load_average": loadavg(),
        "machine": {
            "nproc": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "pycasbin": version("pycasbin"),
        },
        "quick": args.quick,
        "decisions": decisions,
        "build": build,
        "targets": {"p99_us": TARGET_P99_US, "reload_s": TARGET_RELOAD_S},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(decisions, build))
    print(f"\nload average {load_before} → {result['finished_load_average']}; written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
