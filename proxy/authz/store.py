"""Policy store: the model, policy and route files as one validated, swappable snapshot.

`load_snapshot` reads the files and builds everything a decision needs (the engine with
every pattern compiled, the route table); any fault becomes one `PolicyLoadError` naming
the file and line. `PolicyStore` holds the snapshot in force in a plain attribute,
`current`: the request path reads it and never waits. `run()` watches the files and
`reload_now()` rebuilds on demand (the admin API, a Redis announcement); both build the new
snapshot in a worker thread and swap it in with one assignment.

Promises: a broken edit never replaces a good snapshot (the last good one keeps serving,
`status()` says why, the fault is logged once with file:line); a change is picked up within
about a second of the write, once the files have been quiet for a moment, so an editor that
truncates and then rewrites a file is not caught half-way; builds are serialized, so the
snapshot in force always reflects the newest contents that were valid.

`decide_principal` is the decision for an authenticated principal whose roles come from
its token: pure, and equal to pycasbin with the roles added as `g` lines.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.authz.engine import (
    MATCHED_DENY,
    MAX_POLICY_LINES,
    Decision,
    PolicyEngine,
    PolicyError,
    PolicyLine,
    parse_policy_text,
)
from proxy.authz.routes import RouteError, RouteTable, parse_route_file

__all__ = [
    "PolicyLoadError",
    "PolicySnapshot",
    "PolicyStore",
    "build_snapshot",
    "decide_principal",
    "load_snapshot",
]

log = logging.getLogger(__name__)

# How long the files must stay unchanged before a change is read: editors that truncate
# and rewrite in place would otherwise be caught with a half-written file.
SETTLE_S: Final = 0.05
# A stream of writes that never settles is read anyway after this long.
MAX_SETTLE_S: Final = 0.5
REDIS_RETRY_S: Final = 1.0
# Far above any real policy (10,000 rules take about 500 KB); a guard against reading
# something that is not a policy at all into memory, and a bound on the work one reload
# does (every policy value is compiled; see engine.MAX_FIELD_CHARS and MAX_POLICY_LINES).
MAX_FILE_BYTES: Final = 8 * 1024 * 1024
# Files modified this recently may have changed again without their stats changing (coarse
# timestamps); their contents are compared at every poll until they are older.
RACY_NS: Final = 2_000_000_000

_LINE_IN_REASON: Final = re.compile(r"\bline (\d+)\b")
_SECTION_IN_REASON: Final = re.compile(r"\[([a-z_]+)\]")
_FUNCTION_IN_REASON: Final = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\(\)")

# One stat per file: mtime_ns, size and inode (a rename-over changes the inode).
_FileStat = tuple[int, int, int] | None


@dataclass(frozen=True)
class PolicySnapshot:
    """One validated version of the model, policy and route files."""

    engine: PolicyEngine
    routes: RouteTable
    # sha256 over the files' contents (names and lengths included), hex.
    version: str
    loaded_at: float
    files: tuple[str, ...]
    # Every policy line, in order, with its file:line (for listing permissions).
    lines: tuple[PolicyLine, ...] = ()


class PolicyLoadError(Exception):
    """The files do not make a usable policy; str() is one line `file:line: reason`."""

    def __init__(self, file: str, line: int | None, reason: str) -> None:
        self.file = file
        self.line = line
        self.reason = " ".join(reason.split())
        where = file if line is None else f"{file}:{line}"
        super().__init__(f"{where}: {self.reason}")


# -- building -------------------------------------------------------------------------------


def build_snapshot(
    model: tuple[str, bytes],
    policies: Sequence[tuple[str, bytes]],
    routes: tuple[str, bytes],
    *,
    loaded_at: float | None = None,
) -> PolicySnapshot:
    """Build and fully validate a snapshot from file contents, each given as (name, bytes).

    Pure apart from the CPU it burns (a 10,000-rule policy takes a fraction of a second):
    call it off the event loop. Raises `PolicyLoadError`.
    """
    sources = [model[0], *(name for name, _ in policies)]
    model_text = _decode(*model)
    lines: list[PolicyLine] = []
    try:
        for name, data in policies:
            budget = MAX_POLICY_LINES - len(lines)
            lines.extend(parse_policy_text(_decode(name, data), name, max_lines=budget))
        engine = PolicyEngine(model_text, lines, model_source=model[0])
        # Globs compile lazily; a bad one has to fail here, not on some later request.
        engine.warm()
    except PolicyError as exc:
        error = _policy_load_error(str(exc), sources)
        if error.file == model[0] and error.line is None:
            error = PolicyLoadError(error.file, _model_line(model_text, error.reason), error.reason)
        raise error from None
    try:
        table = parse_route_file(routes[1], routes[0])
    except RouteError as exc:
        raise PolicyLoadError(exc.source, exc.line, exc.reason) from None
    return PolicySnapshot(
        engine=engine,
        routes=table,
        version=_digest([model, *policies, routes]),
        loaded_at=time.time() if loaded_at is None else loaded_at,
        files=(model[0], *(name for name, _ in policies), routes[0]),
        lines=tuple(lines),
    )


def load_snapshot(
    model_path: Path, policy_paths: Sequence[Path], routes_path: Path
) -> PolicySnapshot:
    """Read the files and `build_snapshot` from them; raises `PolicyLoadError`."""
    return build_snapshot(
        _read(model_path),
        [_read(path) for path in policy_paths],
        _read(routes_path),
    )


def _read(path: Path) -> tuple[str, bytes]:
    name = str(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise PolicyLoadError(name, None, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise PolicyLoadError(name, None, f"file is larger than {MAX_FILE_BYTES:,} bytes")
    return name, data


def _decode(name: str, data: bytes) -> str:
    # A UTF-8 byte order mark (some Windows editors write one) is not part of the text:
    # pycasbin would read it into the first section header or policy type.
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyLoadError(name, line, "not valid UTF-8") from None


def _policy_load_error(message: str, sources: Sequence[str]) -> PolicyLoadError:
    """Split a `PolicyError` message ("file:line: reason" or "file: reason") into parts."""
    # Longest name first, so "a.csv" does not claim a message about "a.csv.bak".
    for source in sorted(sources, key=len, reverse=True):
        if not message.startswith(source + ":"):
            continue
        rest = message[len(source) + 1 :]
        number, sep, reason = rest.partition(": ")
        if sep and number.isdigit():
            return PolicyLoadError(source, int(number), reason)
        return PolicyLoadError(source, None, rest.lstrip())
    return PolicyLoadError(sources[0] if sources else "<policy>", None, message)


def _model_line(model_text: str, reason: str) -> int | None:
    """Best guess at the model line an error is about: a line number the parser gave, else
    the first definition in the section the reason names, else a line naming the function."""
    lines = model_text.split("\n")
    given = _LINE_IN_REASON.search(reason)
    if given is not None and 1 <= int(given.group(1)) <= len(lines):
        return int(given.group(1))
    section = _SECTION_IN_REASON.search(reason)
    if section is not None:
        header = f"[{section.group(1)}]"
        inside = False
        for number, raw in enumerate(lines, start=1):
            text = raw.strip()
            if text.startswith("["):
                inside = text == header
            elif inside and text and not text.startswith(("#", ";")):
                return number
    function = _FUNCTION_IN_REASON.search(reason)
    if function is not None:
        for number, raw in enumerate(lines, start=1):
            if function.group(1) + "(" in raw and not raw.lstrip().startswith("#"):
                return number
    return None


# -- deciding for a principal with token roles ----------------------------------------------


def decide_principal(
    engine: PolicyEngine,
    subject: str,
    roles: Sequence[str],
    obj: str,
    act: str,
    domain: str | None = None,
) -> Decision:
    """Decide for a principal that holds `roles` (from its token) besides its `g` lines.

    The principal and each role are decided as subjects and combined: any matching deny
    rule denies, else any allow allows, else deny. For the allow/deny effects
    (`some(where (p.eft == allow))`, `!some(where (p.eft == deny))` and both together) this
    is exactly pycasbin with `g, subject, role[, domain]` lines added, since the rules
    reachable from the principal are then the union of those reachable from each. The
    deciding rule reported is that of the first subject (principal, then roles in order)
    that decided so; pycasbin may name another rule of the same effect.
    """
    decision = engine.decide(subject, obj, act, domain)
    if not roles or decision.reason == MATCHED_DENY:
        return decision
    allowed = decision if decision.allowed else None
    for role in roles:
        if role == subject:
            continue
        candidate = engine.decide(role, obj, act, domain)
        if candidate.reason == MATCHED_DENY:
            return candidate
        if allowed is None and candidate.allowed:
            allowed = candidate
    return allowed if allowed is not None else decision


# -- the store ------------------------------------------------------------------------------


class PolicyStore:
    """The snapshot in force, and the machinery that replaces it when the files change."""

    def __init__(
        self,
        model_path: Path,
        policy_paths: Sequence[Path],
        routes_path: Path,
        *,
        poll_interval: float = 0.25,
        on_change: Callable[[PolicySnapshot], None] | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.policy_paths = tuple(Path(path) for path in policy_paths)
        self.routes_path = Path(routes_path)
        if not self.policy_paths:
            raise ValueError("at least one policy file is needed")
        self.poll_interval = poll_interval
        self.on_change = on_change
        self.current: PolicySnapshot
        self.last_error: PolicyLoadError | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0
        # The contents (digest) of the last failed attempt: an unchanged broken state is
        # neither rebuilt, counted nor logged again.
        self._failed_digest: str | None = None
        self._build_lock = asyncio.Lock()
        self._seen_stats: tuple[_FileStat, ...] = ()

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.model_path, *self.policy_paths, self.routes_path)

    def load(self) -> PolicySnapshot:
        """Initial load, synchronous; raises `PolicyLoadError` (the proxy must not start)."""
        self._seen_stats = self._stats()
        snapshot = load_snapshot(self.model_path, self.policy_paths, self.routes_path)
        self.current = snapshot
        self.last_error = None
        log.info(
            "policy loaded: version %s, %d rules, %d routes, engine mode %s",
            snapshot.version[:12],
            snapshot.engine.rule_count,
            len(snapshot.routes.routes),
            snapshot.engine.mode,
        )
        return snapshot

    def status(self) -> str | None:
        """None when the files in force are the newest valid ones; else why not (/readyz)."""
        error = self.last_error
        if error is None:
            return None
        return f"policy reload failed, serving version {self.current.version[:12]}: {error}"

    async def run(self) -> None:
        """Poll the files' stats every `poll_interval` and reload on change; runs until
        cancelled."""
        if not hasattr(self, "current"):
            raise RuntimeError("PolicyStore.load() must succeed before run()")
        while True:
            await asyncio.sleep(self.poll_interval)
            stats = self._stats()
            if stats == self._seen_stats:
                if _recently_modified(stats):
                    # Racy: a same-size rewrite within the filesystem's timestamp
                    # granularity leaves the stats as they were; compare contents instead
                    # (a cheap no-op when they match the version in force).
                    await self.reload_now()
                continue
            stats = await self._settle(stats)
            self._seen_stats = stats
            await self.reload_now()

    async def _settle(self, stats: tuple[_FileStat, ...]) -> tuple[_FileStat, ...]:
        """Wait until the files stop changing (or MAX_SETTLE_S passes)."""
        deadline = time.monotonic() + MAX_SETTLE_S
        while time.monotonic() < deadline:
            await asyncio.sleep(SETTLE_S)
            again = self._stats()
            if again == stats:
                break
            stats = again
        return stats

    def _stats(self) -> tuple[_FileStat, ...]:
        return tuple(_stat(path) for path in self.paths)

    async def reload_now(self) -> PolicySnapshot:
        """Read and rebuild now; swap in the result when it is new and valid.

        Never raises for a bad policy: the error lands in `last_error` and `status()`, and
        the snapshot in force (returned) stays.
        """
        async with self._build_lock:
            loop = asyncio.get_running_loop()
            try:
                contents = await loop.run_in_executor(None, self._read_all)
            except PolicyLoadError as exc:
                # Keyed by the message, so a file that stays missing is reported once.
                self._failed(exc, digest=f"unreadable: {exc}")
                return self.current
            digest = _digest(contents)
            if digest == self._failed_digest:
                return self.current
            if digest == self.current.version:
                # Touched, or edited back to the version in force.
                self._recovered()
                return self.current
            try:
                snapshot = await loop.run_in_executor(None, _build, contents)
            except PolicyLoadError as exc:
                self._failed(exc, digest=digest)
                return self.current
            # A bug in a builder must not end the watcher or replace the good policy.
            except Exception as exc:
                log.exception("policy reload: unexpected error while building")
                error = PolicyLoadError(
                    str(self.model_path), None, f"unexpected error: {type(exc).__name__}: {exc}"
                )
                self._failed(error, digest=digest)
                return self.current
            self._recovered()
            self.current = snapshot
            self.reloads_ok += 1
            log.info(
                "policy reloaded: version %s, %d rules, %d routes, engine mode %s",
                snapshot.version[:12],
                snapshot.engine.rule_count,
                len(snapshot.routes.routes),
                snapshot.engine.mode,
            )
            if self.on_change is not None:
                try:
                    self.on_change(snapshot)
                # The swap happened; a failing listener must not stop later reloads.
                except Exception:
                    log.exception("policy reload: on_change callback failed")
            return snapshot

    def _read_all(self) -> list[tuple[str, bytes]]:
        return [_read(path) for path in self.paths]

    def _recovered(self) -> None:
        if self.last_error is not None:
            log.warning("policy recovered: the files are valid again")
        self.last_error = None
        self._failed_digest = None

    def _failed(self, error: PolicyLoadError, *, digest: str) -> None:
        if digest == self._failed_digest:
            return
        self._failed_digest = digest
        self.last_error = error
        self.reloads_failed += 1
        log.error(
            "policy reload failed, still serving version %s: %s",
            self.current.version[:12],
            error,
        )

    # -- convergence between workers and replicas over Redis pub/sub ------------------------

    async def listen(self, redis_url: str, channel: str) -> None:
        """Reload whenever another worker or replica announces a policy change; runs until
        cancelled, reconnecting after Redis errors."""
        failing = False
        while True:
            client = Redis.from_url(redis_url)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    if failing:
                        log.warning("policy notifications: subscribed to %s again", channel)
                        failing = False
                        # Announcements may have been missed meanwhile.
                        await self.reload_now()
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        await self._announced(message.get("data"))
            except (RedisError, OSError) as exc:
                # Once per outage: the file poller still converges meanwhile.
                if not failing:
                    log.warning("policy notifications: redis error, retrying: %s", exc)
                failing = True
            finally:
                await client.aclose()
            await asyncio.sleep(REDIS_RETRY_S)

    async def _announced(self, data: object) -> None:
        version = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        if version == self.current.version:
            return
        snapshot = await self.reload_now()
        if snapshot.version != version and self.last_error is None:
            # Replicas that do not share the files cannot converge by reloading them.
            log.warning(
                "policy version %s announced, but these files give %s; "
                "are the policy files shared between replicas?",
                version[:12],
                snapshot.version[:12],
            )

    @staticmethod
    async def announce(redis_url: str, channel: str, version: str) -> int:
        """Tell the other workers and replicas that the policy changed; returns how many
        listeners got the message."""
        client = Redis.from_url(redis_url)
        try:
            return int(await client.publish(channel, version))
        finally:
            await client.aclose()


def _stat(path: Path) -> _FileStat:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


def _recently_modified(stats: Sequence[_FileStat]) -> bool:
    newest = max((stat[0] for stat in stats if stat is not None), default=0)
    return time.time_ns() - newest < RACY_NS


def _digest(contents: Sequence[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256()
    for name, data in contents:
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _build(contents: Sequence[tuple[str, bytes]]) -> PolicySnapshot:
    return build_snapshot(contents[0], contents[1:-1], contents[-1])
