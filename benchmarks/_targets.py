"""The systems the proxy benchmark measures, as data.

A `Target` is something wrk can be pointed at: it starts, stops, has a URL and a set of
processes whose memory and CPU are charged to it. Every target fronts (or is) the same
upstream, answers the same request with the same body, and runs on the same CPU, so
their figures are comparable. The authentication, policy and capture modes are
`SidecarProxy` entries with a `Mode` (see `_modes.py`): extra config sections, a bearer
token, or a wrk script that gives every request its own token; their ratios are also
taken to the pass-through sidecar of the same run. Named sets (`TARGET_SETS`) select
targets by purpose.
"""

from __future__ import annotations

import abc
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks._modes import (
    Mode,
    ModeAssets,
    bearer,
    mode_config,
    rotated_tokens_needed,
    rotation_script,
)
from benchmarks._nginx import UPSTREAM_BODY, NginxInstance, render
from benchmarks._probe import TargetFailed, Verification, check_answer, http_get
from benchmarks._procs import ManagedProcess, ProcessFailed, pinned, wait_until
from benchmarks._tls import TestPki
from lineage_sidecar.ports import free_port

REQUEST_PATH = "/"
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Placement:
    """Which CPU the load generator and the servers run on (None: not pinned)."""

    client_cpu: int | None
    server_cpu: int | None

    def describe(self) -> str:
        if self.client_cpu is None or self.server_cpu is None:
            return "not pinned (fewer than 2 CPUs available)"
        return (
            f"wrk pinned to CPU {self.client_cpu}; every server under test and the "
            f"upstream pinned to CPU {self.server_cpu} (taskset)"
        )


@dataclass(frozen=True)
class BenchContext:
    """What every target needs to know about the run it is part of."""

    workdir: Path
    pki: TestPki
    placement: Placement
    upstream_port: int
    upstream_pids: Callable[[], list[int]]
    # Seconds of wrk load each target will get (all rounds and warm-ups) and wrk's
    # connections: how many distinct tokens a token-per-request mode must have ready.
    load_s: float = 0.0
    connections: int = 32

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"


class Target(abc.ABC):
    """One system under test, named in `--targets` and in the report."""

    name: str
    description: str
    tls: bool
    # Ratios in the report are relative to this target (nginx in the same TLS mode).
    compare_to: str
    # A mode's second baseline: the pass-through sidecar, to show what the mode costs.
    pass_through: str | None = None
    # A JWT mode's third: the pass-through sidecar sent the same requests (token and all),
    # so what verification costs is not mixed up with what longer requests cost.
    same_requests: str | None = None
    headers: tuple[str, ...] = ()
    # A wrk Lua script (`--script`) that builds the requests, when headers are not enough.
    wrk_script: Path | None = None

    @abc.abstractmethod
    def start(self, ctx: BenchContext) -> None:
        """Start and wait until ready; raise TargetFailed with the reason otherwise."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop all processes of this target; safe to call when not started."""

    @abc.abstractmethod
    def url(self) -> str:
        """The URL wrk requests."""

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """Root pids of the system under test; memory and CPU sum over their trees."""

    def running(self) -> bool:
        """False once a process of the target has died."""
        return True

    def failure_report(self, what: str) -> str:
        """`what`, plus the log tails of the target's processes where it has any."""
        return what


@dataclass
class UpstreamDirect(Target):
    """wrk straight at the upstream: the ceiling no proxy can beat."""

    name: str = "upstream"
    description: str = "the upstream nginx itself, no proxy (ceiling)"
    tls: bool = False
    compare_to: str = "nginx"
    _ctx: BenchContext | None = None

    def start(self, ctx: BenchContext) -> None:
        self._ctx = ctx

    def stop(self) -> None:
        self._ctx = None

    def url(self) -> str:
        if self._ctx is None:
            raise TargetFailed(f"{self.name} not started")
        return self._ctx.upstream_url + REQUEST_PATH

    def pids(self) -> list[int]:
        return [] if self._ctx is None else self._ctx.upstream_pids()


@dataclass
class NginxProxy(Target):
    """nginx as reverse proxy: 1 worker, keep-alive pool to the upstream, HTTP/1.1."""

    name: str
    tls: bool
    description: str = ""
    compare_to: str = ""
    _nginx: NginxInstance | None = None
    _port: int = 0

    def __post_init__(self) -> None:
        self.compare_to = self.compare_to or self.name
        mode = "TLS 1.3" if self.tls else "plain HTTP"
        self.description = self.description or (
            f"nginx reverse proxy, 1 worker, upstream keepalive pool, {mode}"
        )

    def start(self, ctx: BenchContext) -> None:
        self._port = free_port()
        tls = ""
        if self.tls:
            tls = render(
                "tls.conf.template",
                {"cert_file": str(ctx.pki.cert_file), "key_file": str(ctx.pki.key_file)},
            )
        self._nginx = NginxInstance(
            self.name,
            ctx.workdir / f"nginx-{self.name}",
            "proxy.conf.template",
            {
                "port": str(self._port),
                "upstream_port": str(ctx.upstream_port),
                "listen_flags": " ssl" if self.tls else "",
                "tls": tls,
            },
        )
        self._nginx.start(ctx.placement.server_cpu, self._port)

    def stop(self) -> None:
        if self._nginx is not None:
            self._nginx.stop()

    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self._port}{REQUEST_PATH}"

    def pids(self) -> list[int]:
        return [] if self._nginx is None else self._nginx.pids()

    def running(self) -> bool:
        return self._nginx is not None and self._nginx.running()

    def failure_report(self, what: str) -> str:
        return what if self._nginx is None else self._nginx.failure_report(what)


def sidecar_command() -> list[str]:
    """`lineage-sidecar proxy` from the venv the harness runs in."""
    beside_python = Path(sys.executable).parent / "lineage-sidecar"
    found = str(beside_python) if beside_python.exists() else shutil.which("lineage-sidecar")
    return [found or "lineage-sidecar", "proxy"]


def standin_command() -> list[str]:
    """The naive aiohttp stand-in proxy, which accepts the same YAML as the sidecar."""
    return [sys.executable, "-m", "benchmarks._naive_proxy"]


@dataclass
class SidecarProxy(Target):
    """A proxy started as `<command> --config <yaml>`, ready when admin /readyz says 200."""

    name: str
    tls: bool
    description: str
    command: Callable[[], list[str]] = sidecar_command
    workers: int = 1
    # Extra YAML laid over the generated config (later modes: auth, policy, capture);
    # nested sections merge key by key, so {"proxy": {"limits": ...}} keeps proxy.listen.
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    headers: tuple[str, ...] = ()
    compare_to: str = ""
    # Authentication, policy and capture; set up in `start`, laid over `extra_config`.
    mode: Mode = field(default_factory=Mode)
    pass_through: str | None = None
    same_requests: str | None = None
    wrk_script: Path | None = None
    # How long /readyz may take to answer 200 (much longer under valgrind).
    start_timeout_s: float = START_TIMEOUT_S
    _process: ManagedProcess | None = None
    _port: int = 0

    def __post_init__(self) -> None:
        self.compare_to = self.compare_to or ("nginx-tls" if self.tls else "nginx")
        suffix = "-tls" if self.tls else ""
        if self.mode != Mode() and self.pass_through is None:
            self.pass_through = f"sidecar{suffix}"
        if self.mode.checks_tokens and self.same_requests is None:
            self.same_requests = f"sidecar-bearer{suffix}"

    def prepare_mode(self, ctx: BenchContext, home: Path) -> None:
        """Write the mode's files and pick the token(s) its requests carry."""
        if self.mode == Mode():
            return
        assets = ModeAssets.at(ctx.workdir / "modes")
        self.extra_config = merged(self.extra_config, mode_config(self.mode, assets, home))
        # Idempotent: a target started again replaces its token instead of adding one.
        others = tuple(h for h in self.headers if not h.lower().startswith("authorization:"))
        if self.mode.auth in ("cached", "carried"):
            self.headers = (*others, bearer(assets.bench_token()))
        elif self.mode.auth == "rotating":
            tokens, last = assets.token_file(rotated_tokens_needed(ctx.load_s, ctx.connections))
            script = home / "rotate-tokens.lua"
            script.write_text(rotation_script(tokens, home / "token-cursor"))
            self.wrk_script = script
            # The check sends one of the rotated tokens (the last; wrk starts at the first).
            self.headers = (*others, bearer(last))

    def config(self, ctx: BenchContext, port: int, admin_port: int) -> dict[str, Any]:
        tls: dict[str, Any] = {"enabled": self.tls}
        if self.tls:
            tls |= {"cert_file": str(ctx.pki.cert_file), "key_file": str(ctx.pki.key_file)}
        base: dict[str, Any] = {
            "proxy": {
                "listen": f"127.0.0.1:{port}",
                "upstream": ctx.upstream_url,
                "workers": self.workers,
                "tls": tls,
            },
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "log": {"access_log": None},
        }
        return merged(base, self.extra_config)

    def start(self, ctx: BenchContext) -> None:
        command = self.command()
        _check_help(command)
        self._port, admin_port = free_port(), free_port()
        home = ctx.workdir / f"proxy-{self.name}"
        home.mkdir(parents=True, exist_ok=True)
        self.prepare_mode(ctx, home)
        config_file = home / "config.yaml"
        config_file.write_text(
            yaml.safe_dump(self.config(ctx, self._port, admin_port), sort_keys=False)
        )
        argv = pinned([*command, "--config", str(config_file)], ctx.placement.server_cpu)
        self._process = ManagedProcess(self.name, argv, home)
        try:
            self._process.start()
        except ProcessFailed as exc:
            raise TargetFailed(str(exc)) from exc
        readyz = f"http://127.0.0.1:{admin_port}/readyz"
        process = self._process
        if not wait_until(
            lambda: _status(http_get(readyz)) == 200,
            timeout_s=self.start_timeout_s,
            alive=process.running,
            interval_s=0.2,
        ):
            what = (
                f"{readyz} did not answer 200 within {self.start_timeout_s:g} s "
                f"(last: {http_get(readyz)!r})"
                if process.running()
                else f"exited before {readyz} answered 200"
            )
            raise TargetFailed(process.failure_report(what))

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()

    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self._port}{REQUEST_PATH}"

    def pids(self) -> list[int]:
        if self._process is None or not self._process.running():
            return []
        return [self._process.pid]

    def running(self) -> bool:
        return self._process is not None and self._process.running()

    def failure_report(self, what: str) -> str:
        return what if self._process is None else self._process.failure_report(what)


def merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it; nested sections merge key by key."""
    result = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def _status(answer: tuple[int, bytes] | str) -> int | None:
    return answer[0] if isinstance(answer, tuple) else None


def _check_help(command: Sequence[str]) -> None:
    """Fail early, with its output, when the proxy command does not even run."""
    try:
        probe = subprocess.run(
            [*command, "--help"], capture_output=True, timeout=30, check=False, text=True
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TargetFailed(f"{' '.join(command)} --help: {exc}") from exc
    if probe.returncode != 0:
        lines = (probe.stderr or probe.stdout).strip().splitlines() or ["(no output)"]
        output = "\n".join(lines[-15:])
        raise TargetFailed(
            f"{' '.join(command)} --help exited with status {probe.returncode}: "
            f"{lines[-1].strip()}\n{output}"
        )


def verify(target: Target, pki: TestPki) -> Verification:
    """The target answers 200 with the upstream's exact body (and TLS 1.3 when TLS)."""
    return check_answer(
        target.url(),
        expected_body=UPSTREAM_BODY,
        headers=target.headers,
        ca_file=pki.ca_file,
        require_tls13=target.tls,
    )


# The modes, each with what it switches on and the goal for it (req/s relative to
# the pass-through sidecar of the same run).
_MODES: tuple[tuple[str, Mode, str], ...] = (
    (
        "bearer",
        Mode(auth="carried"),
        "pass-through sent the JWT modes' requests (the bench token unchecked): their "
        "baseline with the same bytes",
    ),
    ("capture", Mode(capture=True), "capture tap on; goal: < 5% below pass-through"),
    (
        "jwt",
        Mode(auth="cached"),
        "JWT (ES256), one token reused: verified-token cache hit; goal: < 5% below pass-through",
    ),
    (
        "jwt-new",
        Mode(auth="rotating"),
        "JWT (ES256), a distinct token on every request (wrk Lua rotation, more tokens than "
        "the 10,000-entry token cache): every request is a cache miss and a signature check",
    ),
    (
        "jwt-policy",
        Mode(auth="cached", policy=True),
        "JWT (cache hit) + Casbin policy of 10,000 rules over 1,000 roles + audit log; "
        "goal: < 10% below pass-through",
    ),
    (
        "full",
        Mode(auth="cached", policy=True, capture=True),
        "JWT (cache hit) + policy (10,000 rules) + audit log + capture tap",
    ),
)


def mode_targets() -> list[Target]:
    """The pass-through sidecar with parts of the gate on, plain and TLS."""
    targets: list[Target] = []
    for tls in (False, True):
        suffix, transport = ("-tls", "TLS 1.3") if tls else ("", "plain HTTP")
        for short, mode, what in _MODES:
            targets.append(
                SidecarProxy(
                    name=f"sidecar-{short}{suffix}",
                    tls=tls,
                    mode=mode,
                    description=f"lineage-sidecar proxy, 1 worker, {transport}: {what}",
                )
            )
    return targets


def default_targets() -> list[Target]:
    """All known targets, in the order rounds visit them; `DEFAULT` names the usual set."""
    return [
        UpstreamDirect(),
        NginxProxy(name="nginx", tls=False),
        NginxProxy(name="nginx-tls", tls=True),
        SidecarProxy(
            name="sidecar",
            tls=False,
            description="lineage-sidecar proxy, pass-through, 1 worker, plain HTTP",
        ),
        SidecarProxy(
            name="sidecar-tls",
            tls=True,
            description="lineage-sidecar proxy, pass-through, 1 worker, TLS 1.3",
        ),
        SidecarProxy(
            name="sidecar-w2",
            tls=False,
            workers=2,
            description="lineage-sidecar proxy, pass-through, workers: 2, plain HTTP",
        ),
        SidecarProxy(
            name="sidecar-w2-tls",
            tls=True,
            workers=2,
            description="lineage-sidecar proxy, pass-through, workers: 2, TLS 1.3",
        ),
        SidecarProxy(
            name="naive",
            tls=False,
            command=standin_command,
            description="naive aiohttp proxy stand-in (benchmarks/_naive_proxy.py), plain HTTP",
        ),
        SidecarProxy(
            name="naive-tls",
            tls=True,
            command=standin_command,
            description="naive aiohttp proxy stand-in (benchmarks/_naive_proxy.py), TLS 1.3",
        ),
        *mode_targets(),
    ]


DEFAULT = ("upstream", "nginx", "nginx-tls", "sidecar", "sidecar-tls")
_MODE_NAMES = tuple(f"sidecar-{short}" for short, _, _ in _MODES)
# Named sets for `--targets`; each mode set carries its baselines (nginx, pass-through).
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT,
    "modes": ("upstream", "nginx", "sidecar", *_MODE_NAMES),
    "modes-tls": ("nginx-tls", "sidecar-tls", *(f"{n}-tls" for n in _MODE_NAMES)),
}


def select_targets(spec: str, known: Sequence[str]) -> tuple[str, ...]:
    """Target names from `--targets`: names and set names (`all`, `default`, `modes`,
    `modes-tls`), comma-separated, in order, each once. ValueError names unknown ones."""
    sets = {**TARGET_SETS, "all": tuple(known)}
    names: list[str] = []
    unknown: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        for name in sets.get(item, (item,)):
            if name not in known:
                unknown.append(name)
            elif name not in names:
                names.append(name)
    if unknown:
        raise ValueError(f"unknown target(s) {', '.join(unknown)}")
    if not names:
        raise ValueError("no targets named")
    return tuple(names)
