"""The systems the proxy benchmark measures, as data.

A `Target` is something wrk can be pointed at: it starts, stops, has a URL and a set of
processes whose memory and CPU are charged to it. Every target fronts (or is) the same
upstream, answers the same request with the same body, and runs on the same CPU, so
their figures are comparable. Later modes (authentication, policy, capture) are new
`SidecarProxy` entries with extra config sections and request headers; nothing else in
the harness needs to change.
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

from benchmarks._nginx import UPSTREAM_BODY, NginxInstance, render
from benchmarks._probe import TargetFailed, Verification, check_answer, http_get
from benchmarks._procs import ManagedProcess, ProcessFailed, free_port, pinned, wait_until
from benchmarks._tls import TestPki

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
    headers: tuple[str, ...] = ()

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
    _process: ManagedProcess | None = None
    _port: int = 0

    def __post_init__(self) -> None:
        self.compare_to = self.compare_to or ("nginx-tls" if self.tls else "nginx")

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
            timeout_s=START_TIMEOUT_S,
            alive=process.running,
            interval_s=0.2,
        ):
            what = (
                f"{readyz} did not answer 200 within {START_TIMEOUT_S:g} s "
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
    ]


DEFAULT = ("upstream", "nginx", "nginx-tls", "sidecar", "sidecar-tls")
