"""Policy files a load refuses, as their author sees it: the store's loader and
`lineage-sidecar policy check` both name the file and line, and nothing is swapped in.

Pure tests: files in a temporary folder, the CLI run in process.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from lineage_sidecar.policycmd import add_policy_commands
from proxy.authz.engine import MAX_FIELD_CHARS, MAX_POLICY_LINES
from proxy.authz.store import PolicyLoadError, load_snapshot

REPO = Path(__file__).resolve().parents[4]
POLICIES = REPO / "policies"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("model.conf", "policy.csv", "routes.yaml"):
        shutil.copy(POLICIES / name, tmp_path / name)
    return tmp_path


def policy_check(folder: Path) -> int:
    parser = argparse.ArgumentParser(prog="lineage-sidecar policy")
    add_policy_commands(parser.add_subparsers(dest="action", required=True))
    args = parser.parse_args(
        [
            "check",
            "--model",
            str(folder / "model.conf"),
            "--policy",
            str(folder / "policy.csv"),
            "--routes",
            str(folder / "routes.yaml"),
        ]
    )
    code: int = args.func(args)
    return code


def load_error(folder: Path) -> PolicyLoadError:
    with pytest.raises(PolicyLoadError) as caught:
        load_snapshot(folder / "model.conf", [folder / "policy.csv"], folder / "routes.yaml")
    return caught.value


# -- effects --------------------------------------------------------------------------------

MISSPELLED_DENY = """\
p, analyst, dataset:sales.*, read, allow
p, analyst, dataset:sales.secret, *, Deny
g, alice, analyst
"""


def test_a_misspelled_deny_is_refused_at_load(folder: Path) -> None:
    (folder / "policy.csv").write_text(MISSPELLED_DENY, encoding="utf-8")

    error = load_error(folder)

    assert (error.file, error.line) == (str(folder / "policy.csv"), 2)
    assert "effect 'Deny' is neither 'allow' nor 'deny'" in error.reason


def test_policy_check_fails_on_a_misspelled_deny(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "policy.csv").write_text(MISSPELLED_DENY, encoding="utf-8")

    assert policy_check(folder) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"{folder / 'policy.csv'}:2: effect 'Deny'")


# -- sizes ----------------------------------------------------------------------------------


def test_a_field_longer_than_the_limit_is_refused_before_compiling(folder: Path) -> None:
    longest = "dataset:" + "a" * (MAX_FIELD_CHARS - len("dataset:"))
    policy = folder / "policy.csv"
    policy.write_text(f"g, alice, analyst\np, analyst, {longest}, read, allow\n", "utf-8")
    snapshot = load_snapshot(folder / "model.conf", [policy], folder / "routes.yaml")
    assert snapshot.engine.decide("alice", longest, "read").allowed

    policy.write_text(f"g, alice, analyst\np, analyst, {longest}a, read, allow\n", "utf-8")
    error = load_error(folder)
    assert (error.file, error.line) == (str(policy), 2)
    assert error.reason == "field 2 is 4,097 characters long, more than the 4,096 allowed"


def test_policy_check_reports_an_oversized_field(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "policy.csv").write_text("p, analyst, d:" + "a" * 400_000 + ", read, allow\n")

    assert policy_check(folder) == 1
    assert capsys.readouterr().err.startswith(f"{folder / 'policy.csv'}:1: field 2 is 400,002")


def test_the_line_limit_counts_every_policy_file(folder: Path) -> None:
    half = MAX_POLICY_LINES // 2 + 10
    first, second = folder / "policy.csv", folder / "more.csv"
    first.write_text("".join(f"g, u{i}, analyst\n" for i in range(half)), "utf-8")
    second.write_text("# more users\n" + "".join(f"g, v{i}, analyst\n" for i in range(half)))

    with pytest.raises(PolicyLoadError) as caught:
        load_snapshot(folder / "model.conf", [first, second], folder / "routes.yaml")

    # Line 1 of the second file is a comment; its line n+1 is policy line half + n.
    assert (caught.value.file, caught.value.line) == (str(second), MAX_POLICY_LINES - half + 2)
    assert "more than 100,000 rule and role lines" in caught.value.reason


# -- encoding -------------------------------------------------------------------------------


def test_a_nul_inside_a_field_is_refused(folder: Path) -> None:
    policy = "g, alice, analyst\np, analyst, data\x00set:x, read, allow\n"
    (folder / "policy.csv").write_text(policy, encoding="utf-8")

    error = load_error(folder)

    assert (error.file, error.line) == (str(folder / "policy.csv"), 2)
    assert "NUL" in error.reason


def test_a_utf8_byte_order_mark_is_ignored(folder: Path) -> None:
    for name in ("model.conf", "policy.csv"):
        path = folder / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())

    snapshot = load_snapshot(folder / "model.conf", [folder / "policy.csv"], folder / "routes.yaml")

    assert snapshot.engine.decide("analyst", "dataset:sales.orders", "read").allowed
