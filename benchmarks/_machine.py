"""The machine a benchmark ran on, and the tools it needs (installed when missing).

Figures are only comparable with the machine and tool versions next to them, so every
result file records them; the load average before and after each run shows how busy
the machine was with other work.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

# Debian packages that provide the binaries the harness runs.
REQUIRED_BINARIES = {"wrk": "wrk", "nginx": "nginx-light", "taskset": "util-linux"}


class ToolMissing(RuntimeError):
    """A required binary is missing and could not be installed."""


def ensure_tools() -> list[str]:
    """Install the Debian packages of missing binaries; returns the packages installed."""
    missing = sorted(
        {package for binary, package in REQUIRED_BINARIES.items() if _which(binary) is None}
    )
    if not missing:
        return []
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise ToolMissing(
                f"missing {missing}; install them: apt-get install {' '.join(missing)}"
            )
        prefix = ["sudo", "-n"]
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"bench: installing {' '.join(missing)} with apt-get", file=sys.stderr)
    for argv in (
        [*prefix, "apt-get", "update", "-q"],
        [*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
    ):
        done = subprocess.run(argv, env=apt_env, check=False)
        if done.returncode != 0:
            raise ToolMissing(f"{' '.join(argv)} failed with status {done.returncode}")
    still = [b for b in REQUIRED_BINARIES if _which(b) is None]
    if still:
        raise ToolMissing(f"still missing after apt-get: {still}")
    return missing


def _which(binary: str) -> str | None:
    # nginx lives in /usr/sbin, which is not on every user's PATH.
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine_info() -> dict[str, object]:
    nginx = _which("nginx") or "nginx"
    return {
        "nproc": os.cpu_count(),
        "cpus_available": sorted(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "memory_total": _meminfo_total(),
        "loadavg_at_start": loadavg(),
        "versions": {
            "nginx": _first_line([nginx, "-v"]).removeprefix("nginx version: nginx/"),
            "wrk": _first_line(["wrk", "--version"]).split(" Copyright")[0].removeprefix("wrk "),
            "openssl": _first_line(["openssl", "version"])
            .split(" (Library")[0]
            .removeprefix("OpenSSL "),
            "python": sys.version.split()[0],
            "aiohttp": _package_version("aiohttp"),
            "uvloop": _package_version("uvloop"),
            "lineage-sidecar": _package_version("lineage-sidecar"),
        },
        "git": {
            "commit": _git("rev-parse", "HEAD"),
            "dirty": bool(_git("status", "--porcelain")),
        },
    }


def _meminfo_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
