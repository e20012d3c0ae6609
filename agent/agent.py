"""The lineage agent process: spool in, lineage events out, nothing lost, nothing doubled.

Loop: read every worker spool (`<spool_dir>/w0`, `w1`, ...; new ones are picked up as
they appear), derive events from each capture record with one `Deriver` (one, so that a
trace whose requests landed on different workers is still one run), collect them in a
batch, and when the batch is due (count, bytes or age, or the spool is drained) hand it
to the sink. Only after the sink acknowledged are the read positions committed.

What it promises:
- At-least-once: a record's position is committed only after every event derived from
  it was acknowledged; a crash at any point re-reads, re-derives and re-sends from the
  last commit. Event ids are deterministic and the store keeps one row per id, so a
  re-sent event is not doubled.
- Re-deriving gives the same events: the deriver's open runs are saved in a checkpoint
  (`<spool_dir>/agent.checkpoint`) together with the positions they cover, written before
  the spool positions are committed. A restarted agent resumes exactly where the
  checkpoint stands (skipping records the checkpoint already covers), so a run that spans
  a crash is neither cut in two nor re-emitted with different content.
- A failing sink (Kafka or PostgreSQL down) is retried with exponential backoff; records
  wait in the spool meanwhile, and nothing is committed. Stopping during an outage
  commits nothing either: the refused batch's records are read again next time.
- Only a drained spool is ticked (idle runs completed by the wall clock); a backlog is
  grouped into runs on the records' own clock, as if it arrived live.
- An event too large for any Kafka message is never dropped: it is written to
  `<spool_dir>/rejected/<event id>.json` (0600), logged and counted.
- One bad spool never stops the others, nor the agent. A capture record that cannot be
  decoded is set aside by the spool reader (`<spool_dir>/w<N>/quarantine/`, counted in
  `records_quarantined`) and reading goes on. A spool the reader refuses (an unknown
  segment format or capture record version, an unreadable position file) stops alone:
  the records read before the refusal are still delivered and committed, the error is
  logged once and stays in `readiness()` until an operator fixes it and restarts.
- SIGTERM: stop reading, send what was derived, checkpoint, commit, close. Open runs stay
  open in the checkpoint (unless `complete_runs_on_stop`).

The checkpoint is plain msgpack (the deriver's open runs, `Deriver.snapshot`), so reading
it runs no code. It is the agent's own file, 0600 beside the spool, and is refused unless
this user owns it and no one else may write it: it decides which records a restart skips.

Counters (`events_derived`, `batches_sent`, `send_failures`, `lag_bytes`,
`records_quarantined`, ...) are plain attributes, read only when `stats()` is asked for
(by a scrape of the admin listener's `/metrics`, `agent.admin`); `readiness()` gives the
reasons the agent is not fully working, which the admin listener's `/readyz` reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import msgspec

from agent.admin import AdminListener, bind_admin, run_until_signalled
from agent.batch import SEAL_OVERHEAD_BYTES, BatchBuilder, EventBatch, EventTooLargeError
from agent.capture import CaptureRecord
from agent.config import AgentProcessConfig
from agent.derive import DeriveConfig, Deriver
from agent.events import LineageEvent, encode
from agent.keys import KeyProviderError, open_key_provider
from agent.metrics import AgentStats
from agent.process import module_main, resolve_dsn
from agent.sink import DirectSink, KafkaSink, Sink, SinkError
from agent.spool import (
    SEGMENT_HEADER_BYTES,
    SpoolFormatError,
    SpoolPosition,
    SpoolReader,
    parse_segment_name,
)
from agent.store.migrate import migrate
from agent.store.writer import StoreError, StoreWriter

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "agent.checkpoint"
CHECKPOINT_FORMAT = 2
REJECTED_DIR = "rejected"
WORKER_SPOOL = re.compile(r"^w\d+$")


# ---- checkpoint --------------------------------------------------------------------------


class CheckpointError(Exception):
    """The checkpoint cannot be trusted; the message says why."""


class CommitMark(NamedTuple):
    """One worker spool in a checkpoint: committed before it (`before`) and covered by it
    (`after`). On restart the reader's committed position says which one held: `after`
    (all done), `before` (the agent died between checkpoint and commit: skip up to
    `after`), or neither (the spool was replaced: skip nothing)."""

    before: SpoolPosition | None
    after: SpoolPosition


@dataclass(frozen=True)
class Checkpoint:
    """The deriver as it stood after the records up to each `after` were fed and sent."""

    deriver: Deriver
    marks: dict[str, CommitMark]


def records_to_skip(
    mark: CommitMark | None, committed: SpoolPosition | None
) -> SpoolPosition | None:
    """Up to where a restarted reader's records are already in the checkpoint. Pure."""
    if mark is None or committed == mark.after:
        return None
    if committed == mark.before:
        return mark.after
    return None


class _CheckpointFile(msgspec.Struct, frozen=True):
    """The checkpoint on disk: plain msgpack data, so reading it runs no code."""

    format: int
    # The exact derivation settings the open runs were made under.
    derive_config: bytes
    # spool directory name -> (before, after) positions, before None at a spool's start.
    marks: dict[str, tuple[tuple[int, int] | None, tuple[int, int]]]
    runs: bytes


def save_checkpoint(
    path: Path, deriver: Deriver, derive_config: DeriveConfig, marks: dict[str, CommitMark]
) -> None:
    """Write the checkpoint atomically and durably (temp file, fsync, rename)."""
    state = _CheckpointFile(
        format=CHECKPOINT_FORMAT,
        derive_config=msgspec.json.encode(derive_config),
        marks={
            name: (
                None if mark.before is None else (mark.before.segment, mark.before.offset),
                (mark.after.segment, mark.after.offset),
            )
            for name, mark in marks.items()
        },
        runs=deriver.snapshot(),
    )
    data = msgspec.msgpack.encode(state)
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(path: Path, derive_config: DeriveConfig) -> Checkpoint | None:
    """The saved checkpoint, None when there is none; a fresh deriver (same marks) when it
    was made under other derivation settings. Refused unless this user owns the file and no
    one else can write it: it decides which spool records are skipped on restart."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise CheckpointError(
                f"{path}: not owned by this user or writable by others; refusing to load it"
            )
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read()
    finally:
        os.close(fd)
    try:
        state = msgspec.msgpack.decode(data, type=_CheckpointFile)
        if state.format != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: unknown checkpoint format {state.format}")
        marks = {
            name: CommitMark(
                None if before is None else SpoolPosition(*before), SpoolPosition(*after)
            )
            for name, (before, after) in state.marks.items()
        }
        deriver = Deriver(derive_config)
        if state.derive_config == msgspec.json.encode(derive_config):
            deriver.restore(state.runs)
        else:
            log.warning(
                "%s: derivation settings changed; open runs start afresh (their requests so "
                "far stay in the store, later ones form new runs)",
                path,
            )
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint: {exc}") from exc
    return Checkpoint(deriver, marks)


# ---- the agent ---------------------------------------------------------------------------


def uncommitted_bytes(directory: Path, committed: SpoolPosition | None) -> int:
    """Bytes of records in a spool directory after its committed position."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            sequence = parse_segment_name(entry.name)
            if sequence is None:
                continue
            try:
                size = entry.stat().st_size
            except FileNotFoundError:
                continue
            if committed is None or sequence > committed.segment:
                total += max(0, size - SEGMENT_HEADER_BYTES)
            elif sequence == committed.segment:
                total += max(0, size - max(committed.offset, SEGMENT_HEADER_BYTES))
    return total


class _Tail:
    """One worker spool being read."""

    def __init__(self, name: str, reader: SpoolReader, skip_until: SpoolPosition | None) -> None:
        self.name = name
        self.reader = reader
        # Records up to here were sent before the last crash (the checkpoint covers them).
        self.skip_until = skip_until
        # Last position read and derived, not yet committed.
        self.pending: SpoolPosition | None = None


class LineageAgent:
    """Runs until `stop()`; see the module docstring for what it promises."""

    def __init__(
        self,
        config: AgentProcessConfig,
        sink: Sink,
        *,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        config.agent.check()
        self._config = config.agent
        self._derive_config = config.derive
        self._sink = sink
        self._clock_ns = clock_ns
        self._root = Path(config.agent.spool_dir)
        self._checkpoint_path = self._root / CHECKPOINT_FILE
        config.kafka.check()
        self._builder = BatchBuilder(
            key_buckets=config.kafka.key_buckets,
            max_part_bytes=(
                config.kafka.max_message_bytes - SEAL_OVERHEAD_BYTES
                if config.agent.sink == "kafka"
                else None
            ),
        )
        self._deriver = Deriver(config.derive)
        self._marks: dict[str, CommitMark] = {}
        # A batch the sink refused while the agent was stopping; sent first on `_finish`.
        self._undelivered: EventBatch | None = None
        self._tails: dict[str, _Tail] = {}
        # Worker spools that are not read, and why (the reader refused their data).
        self._stopped_spools: dict[str, str] = {}
        self._stopping = asyncio.Event()
        # Counters for metrics.
        self.records_read = 0
        self.records_skipped = 0
        self.records_failed = 0
        self.events_derived = 0
        self.events_set_aside = 0
        self.batches_sent = 0
        self.events_sent = 0
        self.send_failures = 0
        # Sends that failed in a row, and the last error; (0, "") while sends go through.
        self._sink_failing: tuple[int, str] = (0, "")
        self.commits = 0
        self.lag_bytes = 0

    @property
    def open_runs(self) -> int:
        return self._deriver.open_runs

    @property
    def spools(self) -> tuple[str, ...]:
        """Worker spools being read (a stopped one is not among them)."""
        return tuple(sorted(name for name in self._tails if name not in self._stopped_spools))

    @property
    def stopped_spools(self) -> dict[str, str]:
        """Worker spool -> why it is no longer read (an operator must look)."""
        return dict(self._stopped_spools)

    @property
    def records_quarantined(self) -> int:
        """Spool records set aside (undecodable or damaged) rather than delivered."""
        return sum(tail.reader.metrics.records_quarantined for tail in self._tails.values())

    def stats(self) -> AgentStats:
        """The counters and gauges as they stand now (for the metrics endpoint)."""
        return AgentStats(
            records_read=self.records_read,
            records_skipped=self.records_skipped,
            records_failed=self.records_failed,
            records_quarantined=self.records_quarantined,
            events_derived=self.events_derived,
            events_set_aside=self.events_set_aside,
            events_sent=self.events_sent,
            batches_sent=self.batches_sent,
            send_failures=self.send_failures,
            commits=self.commits,
            lag_bytes=self.lag_bytes,
            open_runs=self.open_runs,
            spools_reading=len(self.spools),
            spools_stopped=len(self._stopped_spools),
        )

    def readiness(self) -> list[str]:
        """Reasons the agent is not fully working, empty when it is."""
        reasons = [
            f"spool {name} stopped: {reason}"
            for name, reason in sorted(self._stopped_spools.items())
        ]
        failures, error = self._sink_failing
        if failures:
            # Lineage is not leaving this host: records wait in the spool until it does.
            reasons.append(f"sink failing ({failures} attempts in a row): {error}")
        return reasons

    def stop(self) -> None:
        """Ask the loop to finish: send what was derived, commit, return."""
        self._stopping.set()

    async def run(self) -> None:
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
        checkpoint = await asyncio.to_thread(
            load_checkpoint, self._checkpoint_path, self._derive_config
        )
        if checkpoint is not None:
            self._deriver = checkpoint.deriver
            self._marks = dict(checkpoint.marks)
        try:
            self._discover()
            await self._loop()
            await self._finish()
        finally:
            for tail in self._tails.values():
                tail.reader.close()
            self._tails.clear()

    async def _loop(self) -> None:
        config = self._config
        next_tick = next_housekeeping = 0.0
        while not self._stopping.is_set():
            read = 0
            for tail in list(self._tails.values()):
                read += await self._read(tail)
                if self._due():
                    await self._deliver()
            now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + config.tick_interval
                await self._housekeeping()
            if read == 0 and now >= next_tick:
                # Only a drained spool is ticked: while a backlog is replayed, idleness is
                # judged on the records' own clock, as if they arrived live.
                next_tick = now + config.tick_interval
                self._add_events(self._deriver.tick(self._clock_ns()))
            if read == 0:
                # Drained: no reason to hold a partial batch back.
                if len(self._builder) or self._has_pending():
                    await self._deliver()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), config.poll_interval)

    async def _finish(self) -> None:
        """Shutdown: one last delivery of what was derived (no retry: a dead sink would
        hold the shutdown forever, and what is not committed is simply read again)."""
        if self._config.complete_runs_on_stop:
            self._add_events(self._deriver.flush())
        if self._undelivered is not None or len(self._builder) or self._has_pending():
            await self._deliver(retry=False)

    def _discover(self) -> None:
        """Open a reader for every worker spool not yet read."""
        try:
            names = sorted(
                entry.name
                for entry in os.scandir(self._root)
                if entry.is_dir() and WORKER_SPOOL.match(entry.name)
            )
        except FileNotFoundError:
            return
        for name in names:
            if name not in self._tails and name not in self._stopped_spools:
                try:
                    reader = SpoolReader(self._root / name)
                except SpoolFormatError as exc:
                    self._stop_spool(name, exc)
                    continue
                mark = self._marks.get(name)
                committed = reader.committed_position
                if mark is not None and committed not in (mark.before, mark.after):
                    log.warning(
                        "spool %s was committed to %s, the checkpoint knows %s: it was "
                        "replaced; reading it from its own position",
                        reader.directory,
                        committed,
                        mark,
                    )
                self._tails[name] = _Tail(name, reader, records_to_skip(mark, committed))
                log.info("reading spool %s", reader.directory)

    def _stop_spool(self, name: str, exc: SpoolFormatError) -> None:
        self._stopped_spools[name] = str(exc)
        log.error(
            "spool %s is no longer read (the other spools are): %s; fix or move its data "
            "and restart the agent",
            self._root / name,
            exc,
        )

    async def _read(self, tail: _Tail) -> int:
        if tail.name in self._stopped_spools:
            return 0
        try:
            records = await tail.reader.read(self._config.read_records)
        except SpoolFormatError as exc:
            # The records before the refused one were returned by the previous read and
            # are pending: they are delivered and committed like any others.
            self._stop_spool(tail.name, exc)
            return 0
        if records:
            # Off the event loop: one read may hold thousands of records, and parsing a
            # large SQL text takes up to seconds. On the loop, that time would stall the
            # admin listener (a liveness probe then kills the agent, which restarts on the
            # same records) and the sink's connections. Nothing else touches the deriver
            # or the batch while this runs: the loop waits for it.
            await asyncio.to_thread(self._derive, tail, records)
        self.records_read += len(records)
        return len(records)

    def _derive(self, tail: _Tail, records: Sequence[tuple[SpoolPosition, CaptureRecord]]) -> None:
        for position, record in records:
            tail.pending = position
            if tail.skip_until is not None:
                if position <= tail.skip_until:
                    self.records_skipped += 1
                    continue
                tail.skip_until = None
            try:
                events = self._deriver.feed(record)
            except Exception:
                # Derivation is pure and meant never to raise; if a record still makes it,
                # losing that one record beats stopping all lineage. Logged and counted.
                self.records_failed += 1
                log.exception("could not derive lineage from request %s", record.request_id)
                continue
            self._add_events(events)

    def _add_events(self, events: Sequence[LineageEvent]) -> None:
        for event in events:
            try:
                self._builder.add(event)
            except EventTooLargeError as exc:
                self._set_aside(exc)
        self.events_derived += len(events)

    def _set_aside(self, exc: EventTooLargeError) -> None:
        """An event no message can carry: kept on disk for an operator, never dropped.

        It can be replayed through the lineage API (`POST /lineage/track`) once the
        topic's message size limit allows it.
        """
        directory = self._root / REJECTED_DIR
        directory.mkdir(mode=0o700, exist_ok=True)
        path = directory / f"{exc.event.event_id}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(encode(exc.event))
        self.events_set_aside += 1
        log.error("%s; set aside in %s", exc, path)

    def _due(self) -> bool:
        builder, config = self._builder, self._config
        if not len(builder):
            return False
        if (
            len(builder) >= config.max_batch_events
            or builder.encoded_bytes >= config.max_batch_bytes
        ):
            return True
        started = builder.started_at
        return started is not None and time.monotonic() - started >= config.linger

    def _has_pending(self) -> bool:
        return any(tail.pending is not None for tail in self._tails.values())

    async def _housekeeping(self) -> None:
        """New worker spools, and the lag gauge (also while a backlog is replayed)."""
        self._discover()
        self.lag_bytes = await asyncio.to_thread(self._measure_lag)

    def _measure_lag(self) -> int:
        return sum(
            uncommitted_bytes(tail.reader.directory, tail.reader.committed_position)
            for tail in list(self._tails.values())
        )

    async def _deliver(self, *, retry: bool = True) -> bool:
        """Send what was derived, then checkpoint and commit; False if not delivered.

        A batch the sink refused is kept (`_undelivered`) until it goes through: its
        records' positions are pending, and they must not be committed without it.
        """
        while self._undelivered is not None or len(self._builder):
            if self._undelivered is None:
                self._undelivered = self._builder.build()
            if not await self._send(self._undelivered, retry=retry):
                return False
            self._undelivered = None
        await asyncio.to_thread(self._commit)
        return True

    async def _send(self, batch: EventBatch, *, retry: bool) -> bool:
        delay = self._config.retry_initial
        while True:
            try:
                await self._sink.send(batch)
            except (SinkError, StoreError, KeyProviderError, OSError) as exc:
                self.send_failures += 1
                self._sink_failing = (
                    self._sink_failing[0] + 1,
                    str(exc) or type(exc).__name__,
                )
                log.warning(
                    "sending %d events failed (retrying in %.1fs): %s",
                    len(batch.events),
                    delay,
                    exc,
                )
                if not retry or self._stopping.is_set():
                    return False
                # The spool keeps growing meanwhile: keep the gauge honest.
                self.lag_bytes = await asyncio.to_thread(self._measure_lag)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    return False
                delay = min(delay * 2, self._config.retry_max)
                continue
            self._sink_failing = (0, "")
            if batch.events:
                self.batches_sent += 1
                self.events_sent += len(batch.events)
            return True

    def _commit(self) -> None:
        """Checkpoint first, then the spool positions (see `CommitMark` for why)."""
        marks = dict(self._marks)
        for tail in self._tails.values():
            if tail.pending is not None:
                marks[tail.name] = CommitMark(tail.reader.committed_position, tail.pending)
        save_checkpoint(self._checkpoint_path, self._deriver, self._derive_config, marks)
        self._marks = marks
        for tail in self._tails.values():
            if tail.pending is not None:
                tail.reader.commit(tail.pending)
                tail.pending = None
        self.commits += 1


# ---- process entry point -----------------------------------------------------------------


async def open_sink(config: AgentProcessConfig) -> Sink:
    """The sink the configuration names, connected."""
    if config.agent.sink == "kafka":
        return KafkaSink(config.kafka, open_key_provider(config.keys))
    dsn = resolve_dsn(config.store.dsn)
    if config.store.migrate:
        await migrate(dsn)
    writer = await StoreWriter.connect(dsn, max_connections=config.store.max_connections)
    return DirectSink(writer)


async def run_agent(config: AgentProcessConfig) -> None:
    """Run the agent, and its admin listener when configured, until SIGTERM or SIGINT.

    Stop order: the admin listener stops accepting, then the agent sends what it derived,
    checkpoints and commits, then the sink closes."""
    listen = config.agent.admin_listen
    # Bound first: an address in use ends the start before the sink connects or migrates.
    admin_socket = bind_admin(listen) if listen is not None else None
    try:
        sink = await open_sink(config)
    except BaseException:
        if admin_socket is not None:
            admin_socket.close()
        raise
    agent = LineageAgent(config, sink)
    admin = AdminListener(agent, admin_socket) if admin_socket is not None else None
    try:
        await run_until_signalled("agent", agent.run(), agent.stop, admin)
    finally:
        await sink.close()
    log.info(
        "agent stopped: %d records read, %d events sent in %d batches",
        agent.records_read,
        agent.events_sent,
        agent.batches_sent,
    )


def main(argv: list[str] | None = None) -> int:
    return module_main(
        argv,
        prog="python -m agent.agent",
        description=__doc__,
        kind=AgentProcessConfig,
        run=run_agent,
    )


if __name__ == "__main__":
    sys.exit(main())
