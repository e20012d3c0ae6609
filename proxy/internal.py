"""The sidecar's own endpoints (its identity provider, later the lineage API) as backends.

Each runs as an aiohttp application on a unix socket in a private directory (0700) and is
reached through the same forwarding path as the data service, selected by path prefix.
So its requests pass the same gate (path normalization, authentication unless the
endpoint authenticates by itself, policy, audit) and it learns the caller only from the
identity headers the proxy sets: nothing but this process can reach the socket.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

from aiohttp import web

from lineage_sidecar.config import ProxyConfig
from proxy.upstream import UpstreamPool


def longest_prefix_first(backends: Iterable[InternalBackend]) -> tuple[InternalBackend, ...]:
    """The order to try backends in: the most specific prefix wins."""
    return tuple(sorted(backends, key=lambda backend: len(backend.prefix), reverse=True))


class InternalBackend:
    """One application behind a path prefix, served on its own unix socket."""

    def __init__(
        self,
        name: str,
        prefix: str,
        app: web.Application,
        *,
        public: bool,
        max_line_size: int = 8190,
        max_field_size: int = 8190,
        resource: str | None = None,
        reads_session: bool = False,
    ) -> None:
        # "/" serves every path: the backend is the proxy's only upstream (lineage API).
        if not prefix.startswith("/") or (prefix.endswith("/") and prefix != "/"):
            raise ValueError(f"{name}: prefix must start with '/' and not end with one: {prefix!r}")
        self.name = name
        self.prefix = prefix
        # Public backends authenticate callers themselves (a login endpoint cannot ask
        # for a token); the gate skips authentication and policy for them.
        self.public = public
        # Set for backends the route file does not describe (the policy admin API): the
        # gate decides on this resource, with `read` for GET/HEAD and `write` otherwise.
        self.resource = resource
        # The browser sign-in endpoints read (and end) the proxy's session cookie, which is
        # kept from every other backend.
        self.reads_session = reads_session
        self._app = app
        self._limits = (max_line_size, max_field_size)
        self._runner: web.AppRunner | None = None
        self._directory: tempfile.TemporaryDirectory[str] | None = None
        self.pool: UpstreamPool | None = None

    def matches(self, target: str) -> bool:
        prefix = self.prefix
        if prefix == "/":
            return True
        return target.startswith(prefix) and (
            len(target) == len(prefix) or target[len(prefix)] in "/?"
        )

    async def start(self, config: ProxyConfig) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix=f"lineage-sidecar-{self.name}-")
        path = Path(self._directory.name) / "http.sock"
        self._runner = web.AppRunner(
            self._app,
            access_log=None,
            handle_signals=False,
            max_line_size=self._limits[0],
            max_field_size=self._limits[1],
        )
        await self._runner.setup()
        await web.UnixSite(self._runner, str(path)).start()
        path.chmod(0o600)
        self.pool = UpstreamPool(
            "localhost",
            0,
            max_connections=64,
            max_idle=16,
            idle_timeout=config.pool.idle_timeout,
            connect_timeout=config.timeouts.connect,
            unix_path=str(path),
        )

    async def stop(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._directory is not None:
            self._directory.cleanup()
