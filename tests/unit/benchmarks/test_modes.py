"""The benchmark's authentication, policy and capture modes: what they generate is what
the proxy accepts, and it lets the bench user through exactly as a mode means to."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks._modes import (
    ACTION,
    AUDIENCE,
    BENCH_ROLE,
    BENCH_SUBJECT,
    ISSUER,
    MODEL,
    RESOURCE,
    ROUTES,
    RULE_COUNT,
    TOKEN_CACHE_ENTRIES,
    BenchIssuer,
    Mode,
    ModeAssets,
    lua_string,
    mode_config,
    policy_csv,
    read_tokens,
    rotated_tokens_needed,
    rotation_script,
)
from benchmarks._report import RoundResult, TargetSummary, markdown_table, medians_of, with_ratios
from benchmarks._targets import (
    DEFAULT,
    TARGET_SETS,
    BenchContext,
    Placement,
    SidecarProxy,
    default_targets,
    select_targets,
)
from benchmarks._tls import TestPki as Pki
from benchmarks._wrk import WrkReport, parse_wrk_report, wrk_argv
from lineage_sidecar.config import Config, from_mapping
from proxy.authn.jwks import load_key_file
from proxy.authn.jwt import StaticKeys, TrustedIssuers, validate
from proxy.authz.engine import PolicyEngine, parse_policy_text
from proxy.authz.routes import parse_route_file
from proxy.authz.store import decide_principal

KNOWN = [t.name for t in default_targets()]
MODE_NAMES = [
    "sidecar-bearer",
    "sidecar-capture",
    "sidecar-jwt",
    "sidecar-jwt-new",
    "sidecar-jwt-policy",
    "sidecar-full",
]


@pytest.fixture(scope="module")
def issuer() -> BenchIssuer:
    return BenchIssuer.generate()


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine(MODEL, parse_policy_text(policy_csv(), "policy.csv"))


def _context(workdir: Path, load_s: float = 0.0) -> BenchContext:
    # Plain-HTTP targets never read the certificate paths.
    pki = Pki(workdir / "ca.pem", workdir / "chain.pem", workdir / "key.pem")
    return BenchContext(
        workdir=workdir,
        pki=pki,
        placement=Placement(None, None),
        upstream_port=1,
        upstream_pids=list,
        load_s=load_s,
        connections=32,
    )


def _proxy_config(target: SidecarProxy, workdir: Path) -> Config:
    """What `target.start` would hand the proxy, through the proxy's own config loader."""
    home = workdir / f"proxy-{target.name}"
    home.mkdir(parents=True, exist_ok=True)
    ctx = _context(workdir)
    target.prepare_mode(ctx, home)
    return from_mapping(target.config(ctx, 8080, 9901))


def _mode_target(name: str) -> SidecarProxy:
    target = next(t for t in default_targets() if t.name == name)
    assert isinstance(target, SidecarProxy)
    return target


# -- tokens ---------------------------------------------------------------------------------


def test_tokens_are_valid_es256_jwts_with_the_bench_role(issuer: BenchIssuer) -> None:
    now = int(time.time())
    tokens = issuer.mint(50, now=now)
    public_key = pyjwt.PyJWK(issuer.jwks()["keys"][0]).key
    assert len(set(tokens)) == 50  # each request of the rotating mode gets its own
    for token in tokens:
        assert pyjwt.get_unverified_header(token)["kid"] == issuer.kid
        claims = pyjwt.decode(
            token,
            public_key,
            algorithms=["ES256"],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["iss", "aud", "sub", "iat", "nbf", "exp"]},
        )
        assert claims["sub"] == BENCH_SUBJECT
        assert claims["roles"] == [BENCH_ROLE]
        assert claims["exp"] - now >= 3600  # outlives any run


def test_a_token_signed_by_another_key_does_not_verify(issuer: BenchIssuer) -> None:
    forged = BenchIssuer.generate().token(now=int(time.time()), jti="x")
    with pytest.raises(pyjwt.InvalidSignatureError):
        pyjwt.decode(
            forged, pyjwt.PyJWK(issuer.jwks()["keys"][0]).key, algorithms=["ES256"],
            audience=AUDIENCE,
        )  # fmt: skip


def test_proxy_validator_accepts_bench_tokens_with_the_generated_jwks(
    tmp_path: Path, issuer: BenchIssuer
) -> None:
    config = _proxy_config(_mode_target("sidecar-jwt"), tmp_path)
    assert config.auth is not None
    issuer_config = config.auth.jwt_issuers[0]
    assets = ModeAssets.at(tmp_path / "modes")
    keys = StaticKeys({ISSUER: load_key_file(issuer_config)})
    principal = validate(assets.bench_token(), TrustedIssuers([issuer_config]), keys)
    assert principal.id == BENCH_SUBJECT
    assert tuple(principal.roles) == (BENCH_ROLE,)


def test_issuer_key_survives_a_reload_of_the_assets(tmp_path: Path) -> None:
    first = ModeAssets.at(tmp_path)
    again = ModeAssets.at(tmp_path)
    assert again.issuer.jwks() == first.issuer.jwks()
    assert (tmp_path / "issuer-key.pem").stat().st_mode & 0o077 == 0


def test_token_file_holds_distinct_tokens_and_names_its_last(tmp_path: Path) -> None:
    assets = ModeAssets.at(tmp_path)
    path, last = assets.token_file(300)
    tokens = read_tokens(path)
    assert len(tokens) == len(set(tokens)) == 300
    assert last == tokens[-1]
    assert assets.token_file(300) == (path, last)  # made once per run


def test_rotation_outnumbers_the_token_cache_and_scales_with_load() -> None:
    assert rotated_tokens_needed(0.0, 32) > TOKEN_CACHE_ENTRIES + 32
    assert rotated_tokens_needed(10.0, 32) >= 150_000  # 10 s at 10k req/s, x1.5
    assert rotated_tokens_needed(36.0, 32) > rotated_tokens_needed(10.0, 32)
    assert rotated_tokens_needed(1e9, 32) <= 1_000_000


# -- policy and routes ----------------------------------------------------------------------


def test_policy_has_ten_thousand_rules_on_the_compiled_fast_path(engine: PolicyEngine) -> None:
    lines = parse_policy_text(policy_csv(), "policy.csv")
    assert sum(1 for line in lines if line.ptype == "p") == RULE_COUNT
    assert len({line.fields[0] for line in lines if line.ptype == "p"}) == 1_000
    assert engine.mode == "compiled"


def test_bench_role_may_read_the_bench_resource_by_a_rule_near_the_end(
    engine: PolicyEngine,
) -> None:
    decision = decide_principal(engine, BENCH_SUBJECT, [BENCH_ROLE], RESOURCE, ACTION)
    assert decision.allowed
    assert decision.source is not None
    assert int(decision.source.rsplit(":", 1)[1]) > RULE_COUNT * 0.99


@pytest.mark.parametrize(
    ("roles", "obj", "act"),
    [
        ([], RESOURCE, ACTION),  # the subject alone holds nothing
        (["role-0000"], RESOURCE, ACTION),
        ([BENCH_ROLE], RESOURCE, "write"),
        ([BENCH_ROLE], "bench/rootx", ACTION),
        ([BENCH_ROLE], "bench/secret-998-3", ACTION),  # a deny rule of the bench role
    ],
)
def test_nothing_else_is_allowed_to_the_bench_user(
    engine: PolicyEngine, roles: list[str], obj: str, act: str
) -> None:
    assert not decide_principal(engine, BENCH_SUBJECT, roles, obj, act).allowed


def test_other_roles_keep_their_own_grants(engine: PolicyEngine) -> None:
    assert decide_principal(engine, "user-0007", [], "bench/ds-7-0", "read").allowed
    assert decide_principal(engine, "u", ["role-0007"], "bench/area-7-1/x/y", "read").allowed
    assert not decide_principal(engine, "u", ["role-0007"], "bench/ds-8-0", "read").allowed


def test_policy_generator_refuses_impossible_shapes() -> None:
    with pytest.raises(ValueError, match="not one of"):
        policy_csv(role_count=10, rule_count=100, bench_role="role-0998")
    with pytest.raises(ValueError, match="two rules per role"):
        policy_csv(role_count=10, rule_count=15)


def test_route_file_maps_the_bench_request_and_nothing_else() -> None:
    table = parse_route_file(ROUTES, "routes.yaml")
    _, match = table.resolve("GET", "/")
    assert match is not None
    assert (match.resource, match.action) == (RESOURCE, ACTION)
    assert table.resolve("POST", "/")[1] is None
    assert table.resolve("GET", "/other")[1] is None


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in MODE_NAMES if n != "sidecar-jwt-new"])
def test_every_mode_config_passes_the_proxy_config_loader(tmp_path: Path, name: str) -> None:
    target = _mode_target(name)
    config = _proxy_config(target, tmp_path)
    assert config.proxy.listen == "127.0.0.1:8080"  # the harness's sections survive
    assert (config.auth is not None) == target.mode.checks_tokens
    assert (config.policy is not None) == target.mode.policy
    assert (config.capture is not None) == target.mode.capture
    has_token = any(h.startswith("Authorization: Bearer ") for h in target.headers)
    assert has_token == (target.mode.auth != "none")
    if config.policy is not None:
        # Each target audits into its own directory, never into a shared file.
        assert Path(config.policy.audit_log).parent == tmp_path / f"proxy-{name}"


def test_rotating_mode_checks_with_a_rotated_token_and_loads_with_a_script(
    tmp_path: Path,
) -> None:
    target = _mode_target("sidecar-jwt-new")
    config = _proxy_config(target, tmp_path)
    assert config.auth is not None
    assert config.auth.token_cache_entries == TOKEN_CACHE_ENTRIES
    assert target.wrk_script is not None
    script = target.wrk_script.read_text()
    token_file = Path(re.findall(r'token_file = "([^"]+)"', script)[0])
    tokens = read_tokens(token_file)
    assert len(tokens) > TOKEN_CACHE_ENTRIES
    assert target.headers == (f"Authorization: Bearer {tokens[-1]}",)


def test_preparing_a_mode_twice_sends_one_token(tmp_path: Path) -> None:
    target = _mode_target("sidecar-jwt")
    _proxy_config(target, tmp_path)
    _proxy_config(target, tmp_path)
    assert len(target.headers) == 1


def test_policy_without_authentication_is_refused() -> None:
    with pytest.raises(ValueError, match="needs authentication"):
        Mode(policy=True)


def test_pass_through_mode_adds_nothing(tmp_path: Path) -> None:
    assert mode_config(Mode(), ModeAssets.at(tmp_path), tmp_path) == {}


# -- the wrk script -------------------------------------------------------------------------


def test_rotation_script_reads_tokens_once_and_formats_each_request() -> None:
    script = rotation_script(Path("/w/tokens.txt"), Path("/w/cursor"))
    assert 'local token_file = "/w/tokens.txt"' in script
    init = script.split("function init(args)")[1].split("\nend\n")[0]
    assert "io.lines(token_file)" in init
    request = script.split("function request()")[1].split("\nend\n")[0]
    assert "wrk.format(nil, nil, headers)" in request
    assert '"Bearer " .. token' in request
    assert "io." not in request  # no file access per request
    assert "function done(summary, latency, requests)" in script
    assert "Rotated tokens:" in script


def _lua_unquote(literal: str) -> bytes:
    assert literal[0] == literal[-1] == '"'
    out, body, i = bytearray(), literal[1:-1], 0
    while i < len(body):
        if body[i] == "\\":
            out.append(int(body[i + 1 : i + 4]))
            i += 4
        else:
            out += body[i].encode()
            i += 1
    return bytes(out)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_lua_string_round_trips_and_cannot_break_out(text: str) -> None:
    literal = lua_string(text)
    assert _lua_unquote(literal) == text.encode("utf-8", "surrogateescape")
    inner = literal[1:-1]
    assert '"' not in inner
    assert "\n" not in inner
    assert re.fullmatch(r"(?:[A-Za-z0-9/._+,:= -]|\\[0-9]{3})*", inner)


def test_lua_string_escapes_quotes_and_newlines() -> None:
    assert lua_string('a"b\n\\') == '"a\\034b\\010\\092"'


def test_wrk_gets_the_script_before_the_url() -> None:
    argv = wrk_argv("http://127.0.0.1:1/", connections=4, duration_s=1, script=Path("/s.lua"))
    assert argv[-3:] == ["--script", "/s.lua", "http://127.0.0.1:1/"]
    assert "--script" not in wrk_argv("http://127.0.0.1:1/", connections=4, duration_s=1)


WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:1/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.50ms    1.00ms  20.00ms   90.00%
    Req/Sec     9.00k     1.00k   10.00k    80.00%
  Latency Distribution
     50%    3.25ms
     75%    4.00ms
     90%    5.00ms
     99%    8.06ms
  17106 requests in 2.00s, 3.00MB read
Requests/sec:   8553.00
Transfer/sec:      1.50MB
Rotated tokens: 5053 requests sent, 5053 distinct tokens (#2512 to #7564 of 45032): \
each one distinct
"""


def test_wrk_report_keeps_the_rotation_note() -> None:
    report = parse_wrk_report(WRK_OUTPUT)
    assert report.requests_per_s == 8553.0
    assert report.rotated_tokens is not None
    assert report.rotated_tokens.endswith("each one distinct")
    assert parse_wrk_report(WRK_OUTPUT.rsplit("Rotated", 1)[0]).rotated_tokens is None


# -- target selection and the report --------------------------------------------------------


def test_named_sets_expand_in_order_and_once() -> None:
    assert select_targets("default", KNOWN) == DEFAULT
    modes = select_targets("modes", KNOWN)
    assert modes == ("upstream", "nginx", "sidecar", *MODE_NAMES)
    assert select_targets("sidecar,modes", KNOWN)[0] == "sidecar"
    assert select_targets("sidecar,modes", KNOWN).count("sidecar") == 1
    assert select_targets("all", KNOWN) == tuple(KNOWN)
    for names in TARGET_SETS.values():
        assert set(names) <= set(KNOWN)


@pytest.mark.parametrize("spec", ["", ",", "modes,bogus", "sidecar-jwt-tls2"])
def test_unknown_or_empty_selection_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match=r"unknown target|no targets"):
        select_targets(spec, KNOWN)


def test_modes_compare_to_the_pass_through_of_their_tls_mode() -> None:
    targets = {t.name: t for t in default_targets()}
    for name in MODE_NAMES:
        assert targets[name].pass_through == "sidecar"
        assert targets[name].compare_to == "nginx"
        assert targets[f"{name}-tls"].pass_through == "sidecar-tls"
        assert targets[f"{name}-tls"].compare_to == "nginx-tls"
    assert targets["sidecar"].pass_through is None


def test_jwt_modes_also_compare_to_the_same_requests_unchecked() -> None:
    targets = {t.name: t for t in default_targets()}
    for name in ("sidecar-jwt", "sidecar-jwt-new", "sidecar-jwt-policy", "sidecar-full"):
        assert targets[name].same_requests == "sidecar-bearer"
        assert targets[f"{name}-tls"].same_requests == "sidecar-bearer-tls"
    for name in ("sidecar", "sidecar-bearer", "sidecar-capture"):
        assert targets[name].same_requests is None


def test_the_bearer_baseline_carries_the_token_but_configures_no_auth(tmp_path: Path) -> None:
    bearer = Mode(auth="carried")
    assert not bearer.checks_tokens
    assert mode_config(bearer, ModeAssets.at(tmp_path / "modes"), tmp_path) == {}
    with pytest.raises(ValueError, match="needs authentication"):
        Mode(auth="carried", policy=True)


def _summary(
    name: str, rps: float, pass_through: str | None = None, same_requests: str | None = None
) -> TargetSummary:
    wrk = WrkReport(
        requests=int(rps), duration_s=1.0, requests_per_s=rps, read_bytes=0,
        latency_avg_ms=1.0, latency_max_ms=2.0, percentiles_ms={"50": 1.0, "99": 2.0},
        socket_errors={"connect": 0, "read": 0, "write": 0, "timeout": 0}, non_2xx_3xx=0,
    )  # fmt: skip
    rounds = [
        RoundResult(
            round=1, started_at="", wrk=wrk, wrk_output="", peak_rss_kib=1, server_cpu_s=0.5,
            upstream_cpu_s=0.1, other_cpu_on_server_core_s=0.0, interrupts_on_server_core_s=0.0,
            wrk_cpu_s=0.2, loadavg_before="", loadavg_after="",
        )
    ]  # fmt: skip
    fields: dict[str, Any] = {"pass_through": pass_through, "same_requests": same_requests}
    return TargetSummary(
        name=name, description=name, tls=False, compare_to="nginx", url=None, status="ok",
        failure=None, verification=None, rounds=rounds, errors=0, medians=medians_of(rounds),
        ratios=None, **fields,
    )  # fmt: skip


def test_report_gives_modes_a_second_ratio_to_pass_through() -> None:
    summaries = with_ratios(
        [
            _summary("nginx", 10_000),
            _summary("sidecar", 8_000),
            _summary("sidecar-jwt", 7_600, pass_through="sidecar"),
        ]
    )
    jwt_row = summaries[2]
    assert jwt_row.ratios is not None
    assert jwt_row.ratios.requests_per_s == 0.76
    assert jwt_row.pass_through_ratios is not None
    assert jwt_row.pass_through_ratios.requests_per_s == 0.95
    assert summaries[1].pass_through_ratios is None
    table = markdown_table(summaries).splitlines()
    assert "vs pass-through" in table[0]
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "| 0.76x | 0.95x | - |" in table[-1]


def test_report_gives_jwt_modes_a_ratio_to_the_same_requests() -> None:
    summaries = with_ratios(
        [
            _summary("nginx", 10_000),
            _summary("sidecar", 8_000),
            _summary("sidecar-bearer", 7_800, pass_through="sidecar"),
            _summary("sidecar-jwt", 7_410, pass_through="sidecar", same_requests="sidecar-bearer"),
        ]
    )
    jwt_row = summaries[3]
    assert jwt_row.same_requests_ratios is not None
    assert jwt_row.same_requests_ratios.requests_per_s == 0.95
    table = markdown_table(summaries).splitlines()
    assert "vs same requests" in table[0]
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "| 0.74x | 0.93x | 0.95x |" in table[-1]


def test_report_without_modes_keeps_its_columns() -> None:
    table = markdown_table(with_ratios([_summary("nginx", 1.0), _summary("sidecar", 1.0)]))
    assert "pass-through" not in table
