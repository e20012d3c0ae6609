"""The instruction-count benchmark's pure parts: reading callgrind's totals, the ratios."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.proxy_instructions import TargetCount, callgrind_total, markdown, with_ratios


def test_the_total_is_read_from_callgrind_output(tmp_path: Path) -> None:
    # As callgrind 3.19 writes it with --instr-atstart=no: the header's summary says 0.
    out = tmp_path / "callgrind.out"
    out.write_text("events: Ir\nsummary: 0\nfl=(1) x.c\n0 5\ntotals: 1234\n")
    assert callgrind_total(out) == 1234
    # One part per dump: the run's total is their sum.
    out.write_text("events: Ir\ntotals: 1000\npart: 2\ntotals: 234\n")
    assert callgrind_total(out) == 1234


def test_a_file_without_totals_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "callgrind.out"
    out.write_text("events: Ir\n")
    with pytest.raises(ValueError, match="no callgrind totals"):
        callgrind_total(out)


def _count(name: str, per_request: float) -> TargetCount:
    return TargetCount(
        name=name, description=name, requests=100, instructions=int(per_request * 100),
        per_request=per_request,
    )  # fmt: skip


def test_ratios_to_pass_through_and_to_the_same_requests() -> None:
    counts = with_ratios(
        [
            _count("sidecar", 200_000),
            _count("sidecar-bearer", 210_000),
            _count("sidecar-capture", 220_000),
            _count("sidecar-jwt", 231_000),
        ]
    )
    by_name = {c.name: c for c in counts}
    assert by_name["sidecar"].vs_pass_through is None
    assert by_name["sidecar-capture"].vs_pass_through == 1.1
    assert by_name["sidecar-capture"].vs_same_requests is None
    assert by_name["sidecar-jwt"].vs_same_requests == 1.1
    table = markdown(counts).splitlines()
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "| sidecar-jwt | 231,000 | 1.155x | 1.100x | 100 |" in table
