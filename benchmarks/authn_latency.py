"""Latency of authentication itself: the bearer-token check, one call at a time.

Run: `.venv/bin/python -m benchmarks.authn_latency [--quick]`

Issue 3 asks for p99 of authentication under 1 ms. Measured here, in process, with
`time.perf_counter_ns` around each call, for the proxy's `BearerJWT.authenticate` on the
headers of a request:
- **miss**: a token never seen before on every call (ES256 signature checked, claims
  validated, the principal cached);
- **hit**: the same token again (the verified-token cache answers);
and, as the baseline of the same run, pyjwt's own `jwt.decode` of the same new tokens
with the same key, algorithm, audience and issuer: the library call a hand-written check
would make, without the proxy's extra checks (duplicate JSON keys, required claims, claim
paths) or its cache. p50, p99 and max are taken per round; the table gives the median
over rounds, since the machine is shared.

Writes `benchmarks/results/authn_latency.json` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import jwt
from multidict import CIMultiDict, CIMultiDictProxy

from benchmarks._modes import ALGORITHM, AUDIENCE, ISSUER, BenchIssuer
from proxy.authn.chain import BearerJWT
from proxy.authn.jwt import IssuerConfig

RESULTS = Path(__file__).resolve().parent / "results" / "authn_latency.json"


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    """p50, p99 and max of one round, in microseconds."""
    ordered = sorted(samples_ns)
    return {
        "p50_us": ordered[len(ordered) // 2] / 1000,
        "p99_us": ordered[min(len(ordered) - 1, (len(ordered) * 99) // 100)] / 1000,
        "max_us": ordered[-1] / 1000,
    }


def _headers(token: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({"Host": "x", "Authorization": f"Bearer {token}"}))


async def _timed(calls: list[Callable[[], Awaitable[object]]]) -> list[int]:
    samples = []
    for call in calls:
        started = time.perf_counter_ns()
        await call()
        samples.append(time.perf_counter_ns() - started)
    return samples


async def measure(calls_per_round: int, rounds: int) -> dict[str, dict[str, float]]:
    issuer = BenchIssuer.generate()
    with tempfile.TemporaryDirectory() as scratch:
        keys = Path(scratch) / "jwks.json"
        keys.write_text(json.dumps(issuer.jwks()))
        config = IssuerConfig(
            issuer=ISSUER, audiences=(AUDIENCE,), key_file=str(keys), roles_claim="roles",
            algorithms=(ALGORITHM,),
        )  # fmt: skip
        bearer = BearerJWT([config], cache_entries=calls_per_round * rounds * 2)
        await bearer.start()
        public_key = issuer.key.public_key()
        per_round: dict[str, list[dict[str, float]]] = {"miss": [], "hit": [], "pyjwt": []}
        now = int(time.time())
        try:
            for number in range(rounds):
                tokens = issuer.mint(calls_per_round, now=now, first_id=number * calls_per_round)
                fresh = issuer.mint(calls_per_round, now=now, first_id=10**9 + number * 10**6)
                misses = [_headers(t) for t in tokens]

                async def library(token: str) -> object:
                    return jwt.decode(
                        token, public_key, algorithms=[ALGORITHM], audience=AUDIENCE,
                        issuer=ISSUER, options={"require": ["exp", "iss", "aud"]},
                    )  # fmt: skip

                miss = await _timed([partial(bearer.authenticate, h) for h in misses])
                hit = await _timed([partial(bearer.authenticate, h) for h in misses])
                base = await _timed([partial(library, t) for t in fresh])
                for name, samples in (("miss", miss), ("hit", hit), ("pyjwt", base)):
                    per_round[name].append(percentiles(samples))
        finally:
            await bearer.close()
    return {
        name: {
            key: round(statistics.median(r[key] for r in rounds_of), 1)
            for key in ("p50_us", "p99_us", "max_us")
        }
        for name, rounds_of in per_round.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.authn_latency")
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    parser.add_argument("--quick", action="store_true", help="200 calls, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.rounds = 200, 2
    if args.calls < 100 or args.rounds < 1:
        parser.error("--calls must be >= 100 and --rounds >= 1")
    figures = asyncio.run(measure(args.calls, args.rounds))
    labels = {
        "miss": "BearerJWT.authenticate, new token (signature checked)",
        "hit": "BearerJWT.authenticate, same token again (cache hit)",
        "pyjwt": "baseline: jwt.decode of a new token, same key and checks",
    }
    lines = [
        f"Authentication latency, {args.rounds} rounds of {args.calls} calls, "
        "medians over rounds (µs):",
        "",
        "| what | p50 | p99 | max |",
        "|---|---:|---:|---:|",
    ]
    for name, row in figures.items():
        lines.append(f"| {labels[name]} | {row['p50_us']} | {row['p99_us']} | {row['max_us']} |")
    print("\n".join(lines))
    report: dict[str, Any] = {
        "calls_per_round": args.calls,
        "rounds": args.rounds,
        "python": sys.version.split()[0],
        "figures_us": figures,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
