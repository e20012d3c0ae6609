"""Free loopback ports for servers started as separate processes (the demo, tests, benchmarks).

A port has to be chosen before the server binds it, since the server is another process.
Asking the kernel for one (bind to port 0, then close) gives a port from the ephemeral
range, which is also where the kernel takes the local port of every outgoing connection:
between the choice and the server's bind, a client connecting anywhere can be given the
very same port, and the server then fails with "address already in use". Ports are
therefore chosen below the ephemeral range, where the kernel never places a connection,
and checked by binding them. A port is never handed out twice by one process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10_000
"""Ports below this are left to well-known and registered services."""
ATTEMPTS = 1_000

_handed_out: set[int] = set()
_random = random.Random()  # noqa: S311 (a port number, not a secret)


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default when the
    file cannot be read)."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return 32_768, 60_999
    return low, high


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(span: int = 1) -> int:
    """A loopback port P, outside the ephemeral range when there is room, such that P up to
    P + span - 1 are all free now and none was handed out before by this process."""
    if span < 1:
        raise ValueError(f"span must be at least 1, not {span}")
    low, _ = ephemeral_range()
    top = low - span
    if top - LOWEST >= 1_000:
        for _ in range(ATTEMPTS):
            candidate = _random.randint(LOWEST, top)
            ports = range(candidate, candidate + span)
            if not _handed_out.intersection(ports) and all(_bindable(p) for p in ports):
                _handed_out.update(ports)
                return candidate
    # No room below the ephemeral range on this machine: the kernel's choice, with the race
    # described above.
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        ports = range(port, port + span)
        fits = port + span <= 65_536 and not _handed_out.intersection(ports)
        if fits and all(_bindable(p) for p in ports[1:]):
            _handed_out.update(ports)
            return port
