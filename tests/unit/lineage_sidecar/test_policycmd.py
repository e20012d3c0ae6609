"""`lineage-sidecar policy check | test | explain`, run in process with argv lists."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from lineage_sidecar.policycmd import add_policy_commands

REPO = Path(__file__).resolve().parents[3]
POLICIES = REPO / "policies"


def run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lineage-sidecar policy")
    add_policy_commands(parser.add_subparsers(dest="action", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def files(folder: Path | None = None) -> list[str]:
    base = folder or POLICIES
    return [
        "--model",
        str(base / "model.conf"),
        "--policy",
        str(base / "policy.csv"),
        "--routes",
        str(base / "routes.yaml"),
    ]


@pytest.fixture
def copied(tmp_path: Path) -> Path:
    for name in ("model.conf", "policy.csv", "routes.yaml", "tests.yaml"):
        shutil.copy(POLICIES / name, tmp_path / name)
    return tmp_path


# -- check ----------------------------------------------------------------------------------


def test_check_shipped_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["check", *files()]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ")
    assert "routes, engine mode compiled" in out


def test_check_defaults_to_the_policies_folder(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    assert run(["check"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def test_check_names_file_and_line_of_a_bad_policy(
    copied: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = copied / "policy.csv"
    lines = policy.read_text(encoding="utf-8").count("\n")
    with policy.open("a", encoding="utf-8") as handle:
        handle.write("p, bob, dataset:x\n")
    assert run(["check", *files(copied)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{policy}:{lines + 1}: p line has 2 fields")
    assert "\n" not in err


def test_check_names_a_bad_route(copied: Path, capsys: pytest.CaptureFixture[str]) -> None:
    routes = copied / "routes.yaml"
    routes.write_text(
        routes.read_text(encoding="utf-8")
        + "  - {methods: [GET], path: /{db}/{t}/x, resource: 'x:{db}', action: read}\n",
        encoding="utf-8",
    )
    assert run(["check", *files(copied)]) == 1
    assert capsys.readouterr().err.startswith(f"{routes}:")


def test_several_policy_files(copied: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = copied / "extra.csv"
    extra.write_text("g, dave, analyst\n", encoding="utf-8")
    argv = ["explain", "--as", "dave", "GET", "/sales/orders", *files(copied)]
    assert run([*argv, "--policy", str(extra)]) == 0
    assert "decision:   allow" in capsys.readouterr().out


# -- test -----------------------------------------------------------------------------------


def test_shipped_cases_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["test", str(POLICIES / "tests.yaml"), *files()]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    assert out.rstrip().endswith(" passed, 0 failed")


def test_a_mismatch_fails_and_names_the_case(
    copied: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = copied / "cases.yaml"
    cases.write_text(
        "cases:\n"
        "  - {name: reads, as: alice, method: GET, path: /sales/orders, expect: allow}\n"
        "  - name: secret leak\n"
        "    as: alice\n"
        "    method: GET\n"
        "    path: /sales/secret\n"
        "    expect: allow\n",
        encoding="utf-8",
    )
    assert run(["test", str(cases), *files(copied)]) == 1
    out = capsys.readouterr().out
    assert "PASS  reads: GET /sales/orders as alice -> allow (expected allow)" in out
    assert "FAIL  secret leak: GET /sales/secret as alice -> deny (expected allow)" in out
    assert f"at {cases}:3;" in out
    assert "matched deny rule" in out
    assert "1 passed, 1 failed" in out


def test_policy_edit_caught_by_the_cases(copied: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The use in CI: an edit that opens the secret table fails the shipped cases."""
    policy = copied / "policy.csv"
    text = policy.read_text(encoding="utf-8")
    policy.write_text(text.replace("p, analyst, dataset:sales.secret, *, deny\n", ""))
    assert run(["test", str(copied / "tests.yaml"), *files(copied)]) == 1
    assert "FAIL  analyst denied the secret table" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("cases: []\n", "non-empty list of cases"),
        ("cases: [1]\n", "case 1 must be a mapping"),
        ("- {as: a, method: GET, path: /, expect: maybe}\n", "expect must be 'allow' or 'deny'"),
        ("- {as: a, method: GET, path: /, expect: allow, wat: 1}\n", "unknown key(s) wat"),
        ("- {as: a, method: GET, expect: allow}\n", "'path' must be a non-empty string"),
        ("- {as: a, method: GET, path: /, expect: allow, roles: x}\n", "roles must be a list"),
        ("cases: [\n", "invalid YAML"),
        (
            "- as: a\n  method: GET\n  path: /\n  expect: allow\n  expect: deny\n",
            ":5: invalid YAML: duplicate key 'expect' (first on line 4)",
        ),
        ("a: &x [*x]\n", "non-empty list"),
    ],
)
def test_bad_case_files_exit_2_with_a_reason(
    copied: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    cases = copied / "cases.yaml"
    cases.write_text(content, encoding="utf-8")
    assert run(["test", str(cases), *files(copied)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(str(cases))
    assert message in err


def test_missing_case_file(copied: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["test", str(copied / "nope.yaml"), *files(copied)]) == 2
    assert "cannot read" in capsys.readouterr().err


# -- explain --------------------------------------------------------------------------------


def test_explain_an_allowed_request(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["explain", "--as", "alice", "GET", "/sales/orders.json?_size=1", *files()]) == 0
    out = capsys.readouterr().out
    assert "path:       /sales/orders.json" in out
    assert "route:      'table-json' (" in out
    assert "routes.yaml:" in out
    assert "resource:   dataset:sales.orders" in out
    assert "action:     read" in out
    assert "decision:   allow" in out
    assert "rule:       analyst, dataset:sales.*, read, allow  (" in out
    assert "policy.csv:" in out


def test_explain_a_deny_rule(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["explain", "--as", "bob", "GET", "/sales/secret", *files()]) == 1
    out = capsys.readouterr().out
    assert "decision:   deny" in out
    assert "reason:     matched deny rule" in out
    assert "rule:       analyst, dataset:sales.secret, *, deny" in out


def test_explain_with_token_roles(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--as", "dave", "--role", "engineer", "post", "/sales/t/-/insert"]
    assert run([*argv, *files()]) == 0
    out = capsys.readouterr().out
    assert "subjects:   dave, engineer" in out
    assert "request:    POST /sales/t/-/insert" in out


def test_explain_no_rule(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["explain", "--as", "alice", "GET", "/hr/salaries", *files()]) == 1
    assert "reason:     no rule matched: deny by default" in capsys.readouterr().out


def test_explain_no_route(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["explain", "--as", "carol", "DELETE", "/sales/orders", *files()]) == 1
    out = capsys.readouterr().out
    assert "route:      (none)" in out
    assert "no route matches" in out


@pytest.mark.parametrize(
    "target",
    ["/sales%2Fsecret", "/sales/secret%00", "/sales/secret;x", "http://host/sales/secret", "\\x"],
)
def test_explain_rejected_paths(capsys: pytest.CaptureFixture[str], target: str) -> None:
    assert run(["explain", "--as", "carol", "GET", target, *files()]) == 1
    out = capsys.readouterr().out
    assert "path:       (rejected)" in out
    assert "reason:     path rejected (" in out


def test_explain_with_an_invalid_policy(copied: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (copied / "model.conf").write_text("[request_definition]\nr = sub\n", encoding="utf-8")
    assert run(["explain", "--as", "alice", "GET", "/", *files(copied)]) == 1
    assert capsys.readouterr().err.startswith(str(copied / "model.conf"))


# -- SQL authorized table by table ----------------------------------------------------------


def test_explain_sql_reading_a_denied_table(capsys: pytest.CaptureFixture[str]) -> None:
    """The route allows alice the database, but the proxy's gate denies the secret table
    the SQL reads: explain says so, with the deny rule (docs/quickstart.md)."""
    target = "/sales.json?sql=select+*+from+secret"
    assert run(["explain", "--as", "alice", "GET", target, *files()]) == 1
    out = capsys.readouterr().out
    assert "route rule: analyst, database:sales, read, allow  (" in out
    assert "sql:        select * from secret" in out
    assert "decision:   deny" in out
    assert "reason:     SQL reads dataset:sales.secret: matched deny rule" in out
    assert "rule:       analyst, dataset:sales.secret, *, deny  (" in out


def test_explain_sql_reading_allowed_tables(capsys: pytest.CaptureFixture[str]) -> None:
    target = "/sales/-/query.json?sql=select+*+from+orders+join+customers+using(id)"
    assert run(["explain", "--as", "alice", "GET", target, *files()]) == 0
    out = capsys.readouterr().out
    assert "decision:   allow" in out
    assert "reason:     SQL tables allowed (2 checked)" in out


def test_explain_sql_the_proxy_cannot_read_is_denied(capsys: pytest.CaptureFixture[str]) -> None:
    target = "/sales?sql=select+*+from+other.orders"
    assert run(["explain", "--as", "carol", "GET", target, *files()]) == 1
    assert "tables of another database are not allowed" in capsys.readouterr().out


def test_cases_decide_the_sql_in_the_path(copied: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = copied / "cases.yaml"
    cases.write_text(
        "cases:\n"
        "  - {name: sql secret, as: alice, method: GET,"
        " path: '/sales.json?sql=select+*+from+secret', expect: deny}\n"
        "  - {name: sql orders, as: alice, method: GET,"
        " path: '/sales?sql=select+id+from+orders', expect: allow}\n"
        "  - {name: sql secret leak, as: bob, method: GET,"
        " path: '/sales?sql=select+*+from+orders,secret', expect: allow}\n",
        encoding="utf-8",
    )
    assert run(["test", str(cases), *files(copied)]) == 1
    out = capsys.readouterr().out
    assert "PASS  sql secret: " in out
    assert "PASS  sql orders: " in out
    assert "FAIL  sql secret leak: " in out
    assert "SQL reads dataset:sales.secret: matched deny rule" in out
    assert "2 passed, 1 failed" in out
