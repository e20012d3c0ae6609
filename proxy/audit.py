"""Audit log: every authorization decision as a hash-chained JSON line.

Each line carries `seq`, the decision's facts, `prev` (the previous line's hash) and
`hash` = SHA-256 over `prev` and the line's canonical JSON without `hash`. Editing,
removing or reordering a line breaks the chain at that point; `verify()` (and
`lineage-sidecar audit verify FILE`) names the first line that does not hold. A file
continues the chain of the one before it (`prev` of its first line), so rotated files
verify together, and a cut at the start of a file is visible as a chain that does not
begin at the genesis hash unless the previous file is given.

The request path only appends the decision to a list (`record`); a background task
hashes, writes and fsyncs batches from a thread. Nothing is dropped: when `max_pending`
decisions wait (the disk is stuck), `record` returns False and the caller refuses the
request (fail closed) rather than serve it unaudited.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

GENESIS = "0" * 64
FLUSH_INTERVAL = 0.1


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One decision, as the proxy made it."""

    time_ns: int
    request_id: str
    principal: str | None
    roles: tuple[str, ...] = ()
    method: str
    path: str
    resource: str | None
    action: str | None
    decision: str
    rule: str | None = None
    reason: str


class AuditLine(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    entry: AuditEntry
    prev: str
    hash: str = ""  # last: `_hashed_line` fills it in at the end of the encoded line


_encoder = msgspec.json.Encoder(order="deterministic")


# How every encoded line ends before its hash is filled in: `hash` is the last field.
_NO_HASH_TAIL = b'"hash":""}'


def chain_hash(prev: str, seq: int, entry: AuditEntry) -> str:
    return _hashed_line(prev, seq, entry)[0]


def _hashed_line(prev: str, seq: int, entry: AuditEntry) -> tuple[str, bytes]:
    """The line's hash, and the line itself: encoded once, without the hash (what is
    hashed), and the hash put in place of the empty string at the end."""
    prev_bytes = prev.encode()
    body = _encoder.encode(AuditLine(seq=seq, entry=entry, prev=prev))
    digest = hashlib.sha256(prev_bytes + body).hexdigest()
    # Struct fields are encoded in declaration order, so the body ends with the empty
    # hash; the line is byte for byte what encoding it with the hash would give.
    return digest, body[: -len(_NO_HASH_TAIL)] + b'"hash":"' + digest.encode() + b'"}'


class AuditLog:
    """Appends on the request path; hashes and writes in batches from a thread."""

    def __init__(self, path: Path, *, max_pending: int = 1_000_000) -> None:
        self.path = path
        self._max_pending = max_pending
        self._pending: list[AuditEntry] = []
        self._lock = threading.Lock()  # the chain state is the writer thread's
        self._seq, self._prev = _tail(path)
        self.written = 0

    def record(self, entry: AuditEntry) -> bool:
        """Queue a decision; False means the log is stuck and the request must be refused."""
        if len(self._pending) >= self._max_pending:
            return False
        self._pending.append(entry)
        return True

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _write(self, batch: list[AuditEntry]) -> None:
        with self._lock:
            lines = []
            seq, prev = self._seq, self._prev
            for entry in batch:
                seq += 1
                prev, line = _hashed_line(prev, seq, entry)
                lines.append(line)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, b"\n".join(lines) + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            self._seq, self._prev = seq, prev
            self.written += len(batch)

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._write, batch)
        except BaseException:
            # Put the batch back in front so a later flush retries it: never lose a line.
            self._pending[:0] = batch
            raise

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
            except OSError:
                # Logged by the caller's task watcher; decisions keep queuing and the
                # request path fails closed once max_pending is reached.
                await asyncio.sleep(1.0)


def _tail(path: Path) -> tuple[int, str]:
    """The last seq and hash of an existing file, so a restart continues its chain."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            tail = handle.read().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return 0, GENESIS
    for raw in reversed(tail):
        if raw.strip():
            try:
                line = msgspec.json.decode(raw, type=AuditLine)
            except (msgspec.DecodeError, UnicodeDecodeError):
                break
            return line.seq, line.hash
    return 0, GENESIS


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    lines: int
    last_hash: str
    problem: str | None = None


def _lines(paths: Iterable[Path]) -> Iterator[tuple[str, int, bytes]]:
    for path in paths:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                yield str(path), number, raw.rstrip(b"\n")


def verify(paths: Iterable[Path], *, start: str = GENESIS) -> VerifyResult:
    """Check the chain through `paths` in order; the first broken line is the problem."""
    prev = start
    expected_seq: int | None = None
    count = 0
    for name, number, raw in _lines(paths):
        where = f"{name}:{number}"
        try:
            line = msgspec.json.decode(raw, type=AuditLine)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            # msgspec reports invalid UTF-8 as UnicodeDecodeError, not DecodeError.
            return VerifyResult(False, count, prev, f"{where}: not an audit line ({exc})")
        if expected_seq is None:
            expected_seq = line.seq
        if line.seq != expected_seq:
            return VerifyResult(
                False,
                count,
                prev,
                f"{where}: seq {line.seq}, expected {expected_seq} (line removed or reordered)",
            )
        if line.prev != prev:
            return VerifyResult(
                False,
                count,
                prev,
                f"{where}: does not follow the previous line (prev hash differs)",
            )
        if chain_hash(line.prev, line.seq, line.entry) != line.hash:
            return VerifyResult(
                False, count, prev, f"{where}: content does not match its hash (line edited)"
            )
        prev = line.hash
        expected_seq += 1
        count += 1
    return VerifyResult(True, count, prev)
