"""The paired benchmark's arithmetic: which pairs run, and what a round's ratio means."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks.proxy_paired import (
    PairRound,
    Side,
    _command_from,
    markdown_table,
    parse_pairs,
    summarise,
)

KNOWN = ("sidecar", "sidecar-twin", "sidecar-jwt", "sidecar-bearer")


def _round(start: int, number: int, candidate_us: float, baseline_us: float) -> PairRound:
    """A round in which each side completed 1,000 requests in 4 s at the given CPU cost."""

    def side(us: float, requests: int = 1000) -> Side:
        return Side(requests=requests, duration_s=4.0, cpu_s=us * requests / 1e6, errors=0)

    return PairRound(start=start, round=number, candidate=side(candidate_us),
                     baseline=side(baseline_us))  # fmt: skip


def test_pairs_are_read_in_order_once_each() -> None:
    pairs = parse_pairs(" sidecar-jwt:sidecar, sidecar-twin:sidecar,sidecar-jwt:sidecar,", KNOWN)
    assert pairs == (("sidecar-jwt", "sidecar"), ("sidecar-twin", "sidecar"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sidecar-jwt", "is not CANDIDATE:BASELINE"),
        (":sidecar", "is not CANDIDATE:BASELINE"),
        ("sidecar:sidecar", "compares a target with itself"),
        ("sidecar-jwt:nginx-typo", "unknown target 'nginx-typo'"),
        (" , ", "no pairs named"),
    ],
)
def test_bad_pairs_are_named(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pairs(spec, KNOWN)


def test_the_ratio_is_of_each_round_not_of_medians() -> None:
    # The machine ran at very different speeds in these rounds; within each round the
    # candidate cost 3-10% more. A ratio of medians (110 / 200 = 0.55) would say it is
    # half as costly.
    rounds = [_round(1, 1, 110, 100), _round(1, 2, 210, 200), _round(1, 3, 310, 300)]
    summary = summarise("sidecar-jwt", "sidecar", rounds)
    assert summary.cost_ratio_median == pytest.approx(1.05)
    assert summary.rps_ratio_median == pytest.approx(1.0)  # both completed 1,000 requests


def test_each_start_has_its_own_median() -> None:
    rounds = [_round(1, 1, 101, 100), _round(1, 2, 103, 100), _round(2, 1, 99, 100)]
    summary = summarise("sidecar-twin", "sidecar", rounds)
    assert summary.cost_ratio_by_start == [pytest.approx(1.02), pytest.approx(0.99)]
    assert summary.cost_ratio_median == pytest.approx(1.01)


def test_rounds_without_requests_are_left_out_and_an_empty_pair_says_failed() -> None:
    empty = PairRound(
        start=1,
        round=1,
        candidate=Side(requests=0, duration_s=4.0, cpu_s=1.0, errors=32),
        baseline=Side(requests=1000, duration_s=4.0, cpu_s=0.1, errors=0),
    )
    summary = summarise("sidecar-jwt", "sidecar", [empty])
    assert summary.cost_ratio_median is None
    assert summary.errors == 32
    assert "FAILED" in markdown_table([summary])
    counted = summarise("sidecar-jwt", "sidecar", [empty, _round(1, 2, 120, 100)])
    assert counted.cost_ratio_median == pytest.approx(1.2)
    assert "| sidecar-jwt | sidecar | 1.200x |" in markdown_table([counted])


def test_a_baseline_tree_wins_over_the_working_directory(tmp_path: Path) -> None:
    # Run from the repository (as the harness is), `python -c` finds the repository's
    # own packages first; the baseline tree's must be the ones imported all the same.
    tree = tmp_path / "base"
    (tree / "lineage_sidecar").mkdir(parents=True)
    (tree / "lineage_sidecar" / "__init__.py").write_text("")
    (tree / "lineage_sidecar" / "cli.py").write_text(
        "import sys\ndef main() -> int:\n    print('baseline tree', sys.argv[1:])\n    return 0\n"
    )
    repository = Path(__file__).resolve().parents[3]
    argv = _command_from(tree)()
    ran = subprocess.run(
        [*argv, "--config", "x.yaml"], cwd=repository, capture_output=True, text=True, check=True
    )
    assert ran.stdout.strip() == "baseline tree ['proxy', '--config', 'x.yaml']"
