"""Child processes of the benchmark: started in their own session, always stopped.

Every server the harness starts (nginx instances, the sidecar proxy) runs in a new
session, so a Ctrl-C in the terminal reaches only the harness, which then stops each
child's whole process group in order. Memory and CPU of a server are read from /proc
and summed over its process tree, so multi-process servers (nginx master + worker, a
proxy with several workers) are measured whole.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ProcessFailed(RuntimeError):
    """A server did not start or stopped early; the message carries its log tail."""


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """`argv` run under `taskset -c cpu` (taskset execs, so the pid stays the server's)."""
    if cpu is None:
        return list(argv)
    return ["taskset", "-c", str(cpu), *argv]


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    kept = text.splitlines()[-lines:]
    return "\n".join(kept) if kept else f"({path} is empty)"


@dataclass
class ManagedProcess:
    """One server process with its output captured to files in `log_dir`."""

    name: str
    argv: list[str]
    log_dir: Path
    env: Mapping[str, str] | None = None
    extra_logs: list[Path] = field(default_factory=list)
    _popen: subprocess.Popen[bytes] | None = None
    _files: list[IO[bytes]] = field(default_factory=list)

    @property
    def stdout_path(self) -> Path:
        return self.log_dir / f"{self.name}.stdout"

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / f"{self.name}.stderr"

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise ProcessFailed(f"{self.name} was never started")
        return self._popen.pid

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stdout = self.stdout_path.open("wb")
        stderr = self.stderr_path.open("wb")
        self._files = [stdout, stderr]
        try:
            # A new session: terminal signals do not reach the server, and the whole
            # group (nginx workers, proxy workers) can be signalled at once on stop.
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=None if self.env is None else dict(self.env),
                start_new_session=True,
            )
        except OSError as exc:
            self._close_files()
            raise ProcessFailed(f"{self.name}: cannot run {self.argv[0]!r}: {exc}") from exc

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def failure_report(self, what: str) -> str:
        """`what` plus exit status and the tail of every log of this process."""
        status = "not started"
        if self._popen is not None:
            code = self._popen.poll()
            status = "still running" if code is None else f"exit status {code}"
        parts = [f"{self.name}: {what} ({status}); command: {' '.join(self.argv)}"]
        for path in [self.stderr_path, self.stdout_path, *self.extra_logs]:
            parts.append(f"--- tail of {path} ---\n{tail(path)}")
        return "\n".join(parts)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace_s`; safe to call twice."""
        popen = self._popen
        if popen is not None and popen.poll() is None:
            _signal_group(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(popen.pid, signal.SIGKILL)
                popen.wait(timeout=grace_s)
        if popen is not None:
            # Workers that outlived their parent still belong to the group.
            _signal_group(popen.pid, signal.SIGKILL)
        self._close_files()

    def _close_files(self) -> None:
        for handle in self._files:
            handle.close()
        self._files = []


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout_s: float,
    alive: Callable[[], bool],
    interval_s: float = 0.05,
) -> bool:
    """Poll `ready` until true (True), the process dies or the timeout passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return True
        if not alive():
            return False
        time.sleep(interval_s)
    return ready()


def process_tree(roots: Iterable[int]) -> list[int]:
    """The pids of `roots` and all their descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read_stat(int(entry.name))
        if stat is not None:
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found: list[int] = []
    pending = [pid for pid in roots if Path(f"/proc/{pid}").exists()]
    while pending:
        pid = pending.pop()
        if pid in found:
            continue
        found.append(pid)
        pending.extend(children.get(pid, []))
    return sorted(found)


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; it ends at the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def peak_rss_kib(pids: Iterable[int]) -> int:
    """Sum of VmHWM (peak resident set size) over the process trees of `pids`.

    A sum over processes counts pages shared between them (e.g. after fork) more than
    once, so for multi-process servers it is an upper bound.
    """
    total = 0
    for pid in process_tree(pids):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total


def cpu_seconds(pids: Iterable[int]) -> float:
    """User+system CPU time consumed so far by the process trees of `pids`."""
    user_s, system_s = user_system_seconds(pids)
    return user_s + system_s


def user_system_seconds(pids: Iterable[int]) -> tuple[float, float]:
    """User and system (kernel) CPU time so far of the process trees of `pids`, apart."""
    user = system = 0
    for pid in process_tree(pids):
        stat = _read_stat(pid)
        if stat is not None:
            # utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name.
            user += int(stat[11])
            system += int(stat[12])
    return user / _CLOCK_TICKS, system / _CLOCK_TICKS


def run_time_s(pids: Iterable[int]) -> float:
    """Time on a CPU so far of every live thread in the process trees of `pids`, from
    /proc/PID/task/TID/schedstat (nanoseconds, where `cpu_seconds` counts 10 ms ticks).

    Threads that have exited are not counted: use it over windows in which the threads
    of the measured processes live on (a proxy's writer and executor threads do). On a
    kernel without schedstat files it falls back to `cpu_seconds`.
    """
    total_ns = 0
    read_any = False
    tree = process_tree(pids)
    for pid in tree:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                total_ns += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue
            read_any = True
    return total_ns / 1e9 if read_any else cpu_seconds(tree)


@dataclass(frozen=True)
class CoreTimes:
    """Cumulative busy time of one CPU, in seconds, split by what it was spent on."""

    tasks_s: float  # user + nice + system of all processes, plus hypervisor steal
    interrupts_s: float  # irq + softirq (loopback network processing lands here)


def core_times(cpu: int | None) -> CoreTimes:
    """Busy time of one CPU so far, from /proc/stat; zeros when `cpu` is None.

    Compared with the CPU time of our own servers over a run, `tasks_s` shows how much of
    the server core other processes (or the hypervisor) of a shared machine took.
    """
    if cpu is not None:
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            fields = line.split()
            if fields and fields[0] == f"cpu{cpu}":
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
                return CoreTimes(
                    tasks_s=(user + nice + system + steal) / _CLOCK_TICKS,
                    interrupts_s=(irq + softirq) / _CLOCK_TICKS,
                )
    return CoreTimes(0.0, 0.0)
