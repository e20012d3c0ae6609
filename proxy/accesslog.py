"""Structured JSON access log, written in batches off the request path.

A request appends one tuple to a bounded in-memory list (no formatting, no IO); a
background task encodes the batch as JSON lines and writes it from a thread every
`FLUSH_INTERVAL` seconds. When the buffer is full, entries are dropped and counted rather
than slowing the proxy: the audit trail of decisions is a separate, lossless log.
"""

from __future__ import annotations

import asyncio
import datetime
import sys
from collections.abc import Callable
from typing import IO

import msgspec

from agent.capture import with_text_escaped

FLUSH_INTERVAL = 0.25

# request_id, unix time, remote, method, path, status, bytes_out, duration (s), user agent
Entry = tuple[str, float, str | None, str, str, int, int, float, str | None]


class AccessLogLine(msgspec.Struct, kw_only=True):
    time: str
    request_id: str
    remote: str | None
    method: str
    path: str
    status: int
    bytes_out: int
    duration_ms: float
    user_agent: str | None


class AccessLog:
    """Collects entries on the hot path; `run()` drains them to `path` ('-' = stdout)."""

    def __init__(self, path: str, capacity: int, on_drop: Callable[[], None]) -> None:
        self._path = path
        self._capacity = capacity
        self._on_drop = on_drop
        self._entries: list[Entry] = []
        self._encoder = msgspec.json.Encoder()
        self._stream: IO[bytes] | None = None

    def record(self, entry: Entry) -> None:
        if len(self._entries) >= self._capacity:
            self._on_drop()
            return
        self._entries.append(entry)

    def _encode(self, batch: list[Entry]) -> bytes:
        lines = []
        for rid, ts, remote, method, path, status, size, duration, agent in batch:
            when = datetime.datetime.fromtimestamp(ts, datetime.UTC)
            line = AccessLogLine(
                time=when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                request_id=rid,
                remote=remote,
                method=method,
                path=path,
                status=status,
                bytes_out=size,
                duration_ms=round(duration * 1000, 3),
                user_agent=agent,
            )
            try:
                lines.append(self._encoder.encode(line))
            except UnicodeEncodeError:
                # Target or User-Agent bytes that were not UTF-8 reach us as lone
                # surrogates, which JSON cannot carry: written escaped, not lost (an
                # exception here would end the log's task).
                lines.append(self._encoder.encode(with_text_escaped(line)))
        return b"\n".join(lines) + b"\n"

    def _write(self, batch: list[Entry]) -> None:
        data = self._encode(batch)
        if self._stream is None:
            self._stream = sys.stdout.buffer if self._path == "-" else open(self._path, "ab")  # noqa: SIM115
        self._stream.write(data)
        self._stream.flush()

    async def flush(self) -> None:
        if not self._entries:
            return
        batch, self._entries = self._entries, []
        await asyncio.get_running_loop().run_in_executor(None, self._write, batch)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await self.flush()

    def close(self) -> None:
        if self._stream is not None and self._stream is not sys.stdout.buffer:
            self._stream.close()
        self._stream = None
