"""Spool: the durable hand-off from the proxy (one writer) to the agent (one reader).

What it promises:
- `SpoolWriter.append()` is cheap and never blocks the event loop: it encodes the record
  and puts it in a memory buffer. A dedicated writer thread frames the buffered records
  (length and CRC), writes them to the current segment file and fsyncs it in batches
  (every `flush_interval_s` or `flush_bytes`), so a record is durable at most one flush
  interval after it was accepted.
- The spool is bounded: segment files not yet deleted plus the buffer stay within
  `max_bytes`. When full, the writer counts it, logs (rate limited) and applies the policy:
  `fail_open` drops the record, `block` makes `append_wait()` wait for space.
- `SpoolReader` returns records in the order they were appended, with positions. Its read
  position is stored durably only by `commit()`, which the agent calls after the sink
  acknowledged; a restarted reader resumes just after the last commit, so records are
  delivered at least once and, across commits, in order. Fully delivered segments are
  deleted, which frees the writer's budget.
- The format is versioned. A reader meeting an unknown segment format or capture record
  version raises `SpoolFormatError` instead of guessing. A frame torn by a crash is
  detected by its length and CRC and skipped, never returned, and never stops the
  segments written after it; so is a segment file with no complete header (a crash
  between creating it and writing its header), deleted once a newer segment exists.
- A record this reader cannot use but must not lose is set aside, never dropped: a frame
  whose CRC checks out but whose content does not decode as a capture record of the
  known version, or a frame damaged in the middle of a segment (see `diagnose_damage`),
  is copied, with its segment, offset and the reason, into `<spool dir>/quarantine/`
  (see `quarantine_name`), counted in `records_quarantined`, logged once, and reading
  goes on with the next intact frame. Only a torn tail, from which no later frame can
  be recovered, is skipped.

One writer process and one reader process per directory, enforced by `flock`
(`SpoolBusyError`): proxy workers each need their own spool directory. A record's
position points just past it; `commit(position)` means it and all before it are delivered.

On disk, a spool directory holds `<20-digit sequence>.seg` files, `writer.lock`,
`reader.lock`, `reader.position` and, once something was set aside, `quarantine/`. A
segment is a 24-byte header (magic, format version, capture record version, sequence
number) followed by frames: u32 payload length, u32 CRC-32 of the payload, then the
msgpack-encoded `CaptureRecord`. The capture record version is pinned in the segment
header because `CaptureRecord` omits default fields, its version included, so the payload
alone cannot tell a v1 record from a newer one.

Why a dedicated writer thread rather than `loop.run_in_executor`: one thread serializes
writes, rotations and fsyncs without chaining futures; a slow fsync cannot starve (or be
starved by) the shared default executor that DNS lookups and other `to_thread` users rely
on; and the hot path pays only a deque append (no lock, no future, no loop callback).
The thread spends its time in `write`/`fdatasync`, which release the GIL.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import msgspec

from agent.capture import CAPTURE_VERSION, CaptureRecord, with_text_escaped

log = logging.getLogger(__name__)

SEGMENT_MAGIC = b"LSSPOOL\x00"
SEGMENT_FORMAT_VERSION = 1
SEGMENT_SUFFIX = ".seg"
POSITION_FORMAT_VERSION = 1
POSITION_FILE = "reader.position"
WRITER_LOCK_FILE = "writer.lock"
READER_LOCK_FILE = "reader.lock"
QUARANTINE_DIR = "quarantine"
QUARANTINE_FORMAT_VERSION = 1

# magic, segment format version, capture record version, reserved, segment sequence number
_SEGMENT_HEADER = struct.Struct("<8sHHIQ")
SEGMENT_HEADER_BYTES = _SEGMENT_HEADER.size
# payload length, CRC-32 of the payload
_FRAME_HEADER = struct.Struct("<II")
FRAME_HEADER_BYTES = _FRAME_HEADER.size
_pack_frame_header = _FRAME_HEADER.pack
_SEQUENCE_DIGITS = 20
# The header holds a segment's sequence number in 64 bits, and the writer starts the segment
# after the newest: a larger number (in a file name or a hand-edited position) is refused.
MAX_SEGMENT_SEQUENCE = 2**64 - 2
# Hard cap on one record, for writer and reader alike. The reader uses it (not the
# writer's configured limit, which it cannot know) to tell a garbage length from a record.
RECORD_BYTES_LIMIT = 16 << 20

FullPolicy = Literal["fail_open", "block"]


class SpoolFormatError(Exception):
    """The spool holds data this code does not understand; an operator must look."""


class UndecodableRecordError(SpoolFormatError):
    """An intact frame (its CRC checks out) whose content is not a capture record of the
    version this reader knows, yet claims that version: set aside, not a reason to stop."""


class SpoolFullError(Exception):
    """`append()` under the `block` policy found the spool full; use `append_wait()`."""


class SpoolClosedError(Exception):
    """The writer was closed."""


class SpoolBusyError(Exception):
    """Another process already writes (or reads) this spool directory."""


class SpoolPosition(NamedTuple):
    """A place in the spool: just after one record. Positions order like the records."""

    segment: int
    offset: int


class SpoolOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Writer limits and flush cadence."""

    # Budget for all segment files not yet deleted plus the in-memory buffer.
    max_bytes: int = 1 << 30
    # A new segment starts when the next frame would not fit in this size.
    segment_bytes: int = 16 << 20
    # A record whose encoding exceeds this is dropped and counted (never written).
    max_record_bytes: int = 1 << 20
    # fdatasync at least this often while records are buffered (the most a crash loses)...
    flush_interval_s: float = 0.1
    # ...and as soon as this many bytes are buffered.
    flush_bytes: int = 256 << 10
    when_full: FullPolicy = "fail_open"
    # Minimum seconds between two "spool full" log lines.
    full_log_interval_s: float = 10.0

    def check(self) -> None:
        """Raise ValueError naming the field when the combination cannot work."""
        if not 64 <= self.max_record_bytes <= RECORD_BYTES_LIMIT:
            raise ValueError(f"spool.max_record_bytes must be 64 to {RECORD_BYTES_LIMIT}")
        if self.segment_bytes < SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES + self.max_record_bytes:
            raise ValueError("spool.segment_bytes must hold at least one max_record_bytes record")
        # The reader never deletes the newest segment (the writer may be appending to it),
        # so the budget must leave room for a full newest segment and one more.
        if self.max_bytes < 2 * self.segment_bytes:
            raise ValueError("spool.max_bytes must be at least twice spool.segment_bytes")
        if self.flush_interval_s <= 0 or self.flush_bytes <= 0:
            raise ValueError("spool.flush_interval_s and spool.flush_bytes must be positive")
        if self.when_full not in ("fail_open", "block"):
            raise ValueError("spool.when_full must be 'fail_open' or 'block'")


@dataclass(slots=True)
class SpoolWriterMetrics:
    """Plain counters and gauges; the metrics endpoint reads them.

    Each field has one writing thread (the appending thread or the writer thread), so
    the hot path updates them without a lock.
    """

    appended: int = 0
    appended_bytes: int = 0
    dropped_full: int = 0
    dropped_oversize: int = 0
    blocked: int = 0
    flushed_records: int = 0
    written_bytes: int = 0
    fsyncs: int = 0
    segments_created: int = 0
    write_errors: int = 0
    # Bytes of segment files on disk, as the writer last counted them.
    disk_bytes: int = 0

    @property
    def buffered_bytes(self) -> int:
        """Accepted but not yet written."""
        return self.appended_bytes - self.written_bytes


@dataclass(slots=True)
class SpoolReaderMetrics:
    records_read: int = 0
    commits: int = 0
    segments_deleted: int = 0
    torn_tails_skipped: int = 0
    bytes_skipped: int = 0
    # Records (or damaged bytes) copied to the quarantine instead of being delivered.
    records_quarantined: int = 0
    bytes_quarantined: int = 0
    # Segment files with no complete header, skipped (and deleted once not the newest).
    empty_segments_skipped: int = 0


class _RateLimitedWarning:
    """Logs at most one warning per interval and says how many it held back."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._last = -interval_s
        self._suppressed = 0

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval_s:
            self._suppressed += 1
            return
        suppressed, self._suppressed, self._last = self._suppressed, 0, now
        log.warning(message + " (%d similar suppressed)", *args, suppressed)


# ---- format: pure functions -------------------------------------------------------------


def segment_name(sequence: int) -> str:
    return f"{sequence:0{_SEQUENCE_DIGITS}d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    stem = name[: -len(SEGMENT_SUFFIX)]
    if name.endswith(SEGMENT_SUFFIX) and len(stem) == _SEQUENCE_DIGITS and stem.isdigit():
        sequence = int(stem)
        return sequence if sequence <= MAX_SEGMENT_SEQUENCE else None
    return None


def encode_segment_header(
    sequence: int,
    *,
    format_version: int = SEGMENT_FORMAT_VERSION,
    record_version: int = CAPTURE_VERSION,
) -> bytes:
    return _SEGMENT_HEADER.pack(SEGMENT_MAGIC, format_version, record_version, 0, sequence)


def parse_segment_header(header: bytes, *, expected_sequence: int, where: str) -> None:
    """Check a complete segment header; raise SpoolFormatError on anything unknown."""
    magic, format_version, record_version, _reserved, sequence = _SEGMENT_HEADER.unpack(header)
    if magic != SEGMENT_MAGIC:
        raise SpoolFormatError(f"{where}: not a spool segment (bad magic {magic!r})")
    if format_version != SEGMENT_FORMAT_VERSION:
        raise SpoolFormatError(
            f"{where}: unknown spool segment format version {format_version} "
            f"(this reader knows {SEGMENT_FORMAT_VERSION}); upgrade the agent"
        )
    if record_version != CAPTURE_VERSION:
        raise SpoolFormatError(
            f"{where}: unknown capture record version {record_version} "
            f"(this reader knows {CAPTURE_VERSION}); upgrade the agent"
        )
    if sequence != expected_sequence:
        raise SpoolFormatError(
            f"{where}: header says segment {sequence}, file name says {expected_sequence}"
        )


def encode_frame(payload: bytes) -> bytes:
    return _pack_frame_header(len(payload), zlib.crc32(payload)) + payload


FrameStop = Literal["end", "short", "corrupt", "limit"]


class FrameScan(NamedTuple):
    # (offset just past the frame, payload), offsets relative to the scanned buffer
    frames: list[tuple[int, memoryview]]
    # end: buffer fully consumed; short: the next frame is not all there (needed = bytes
    # from `consumed` to complete it); corrupt: bad length or CRC at `consumed`;
    # limit: max_frames reached.
    stop: FrameStop
    consumed: int
    needed: int


def scan_frames(data: bytes, *, max_record_bytes: int, max_frames: int) -> FrameScan:
    """Split a buffer into CRC-checked frames, stopping at the first one not intact."""
    view = memoryview(data)
    frames: list[tuple[int, memoryview]] = []
    pos = 0
    size = len(data)
    while pos < size:
        if len(frames) >= max_frames:
            return FrameScan(frames, "limit", pos, 0)
        if size - pos < FRAME_HEADER_BYTES:
            return FrameScan(frames, "short", pos, FRAME_HEADER_BYTES)
        length, crc = _FRAME_HEADER.unpack_from(data, pos)
        # Never an empty payload (a record is a msgpack map): zeros, as a crash can leave
        # them, would otherwise pass as frames, the CRC-32 of nothing being 0.
        if not 0 < length <= max_record_bytes:
            return FrameScan(frames, "corrupt", pos, 0)
        end = pos + FRAME_HEADER_BYTES + length
        if end > size:
            return FrameScan(frames, "short", pos, FRAME_HEADER_BYTES + length)
        payload = view[pos + FRAME_HEADER_BYTES : end]
        if zlib.crc32(payload) != crc:
            return FrameScan(frames, "corrupt", pos, 0)
        frames.append((end, payload))
        pos = end
    return FrameScan(frames, "end", pos, 0)


class Damage(NamedTuple):
    """What to do about the bytes at a place where no intact frame starts."""

    # wait: the newest segment, which the writer may still be writing: read it again
    # later. set_aside: quarantine `length` bytes and go on after them. torn_tail: no
    # intact frame follows; skip the `length` bytes left in the segment.
    action: Literal["wait", "set_aside", "torn_tail"]
    length: int
    reason: str


FrameCheck = Literal["ok", "end", "short", "bad", "crc"]

# Where a frame's payload may start: a capture record is a msgpack map (fixmap, or map16
# for more than 15 fields) whose first key is a field name, a short string.
_PAYLOAD_START = re.compile(rb"(?:[\x80-\x8f]|\xde..)[\xa0-\xbf]", re.DOTALL)
# Most CRC work one resynchronisation may do before it calls the rest a torn tail.
_RESYNC_CRC_BUDGET = 256 << 20


def _check_frame(data: bytes, pos: int, max_record_bytes: int) -> tuple[FrameCheck, int]:
    """The frame at `pos`: intact ("ok"), none ("end"), not all there ("short"), an
    impossible length ("bad") or a CRC mismatch ("crc"); and where it would end."""
    if pos == len(data):
        return "end", pos
    if len(data) - pos < FRAME_HEADER_BYTES:
        return "short", pos + FRAME_HEADER_BYTES
    length, crc = _FRAME_HEADER.unpack_from(data, pos)
    if not 0 < length <= max_record_bytes:
        return "bad", pos
    end = pos + FRAME_HEADER_BYTES + length
    if end > len(data):
        return "short", end
    if zlib.crc32(memoryview(data)[pos + FRAME_HEADER_BYTES : end]) != crc:
        return "crc", end
    return "ok", end


def resynchronise(data: bytes, start: int, *, max_record_bytes: int) -> int | None:
    """The first position from `start` on where an intact frame begins, or None.

    Cheap tests come first (a payload that starts like a capture record, a possible
    length, a frame that fits and is followed by the segment's end or a possible length);
    the CRC is computed only for what passes them, and at most `_RESYNC_CRC_BUDGET` bytes
    in all, so one resynchronisation costs about one pass over the segment.

    False positives: bytes that are not a frame pass a CRC-32 check with odds 2**-32 per
    candidate; in random bytes about one position in 50,000 passes the cheap tests
    (1 MiB records), so a 16 MiB damaged stretch gives odds near 1 in 10**7. A false frame
    must then also decode as a capture record to be delivered; otherwise it is set aside
    too. A frame written inside a record's own text (a client's SQL) can be found first,
    if the damage lies just before it: the record holding it is then set aside, not lost.
    """
    view = memoryview(data)
    budget = _RESYNC_CRC_BUDGET
    size = len(data)
    for match in _PAYLOAD_START.finditer(data, start + FRAME_HEADER_BYTES):
        pos = match.start() - FRAME_HEADER_BYTES
        length, crc = _FRAME_HEADER.unpack_from(data, pos)
        end = pos + FRAME_HEADER_BYTES + length
        if not 0 < length <= max_record_bytes or end > size:
            continue
        if size - end >= 4:
            (following,) = struct.unpack_from("<I", data, end)
            if not 0 < following <= max_record_bytes:
                continue
        budget -= length
        if budget < 0:
            return None
        if zlib.crc32(view[pos + FRAME_HEADER_BYTES : end]) == crc:
            return pos
    return None


def diagnose_damage(data: bytes, *, sealed: bool, max_record_bytes: int) -> Damage:
    """`data` runs from a place where no intact frame starts to the segment's end. Pure.

    A sealed segment (a newer one exists) is complete, so its damage is judged now:
    - a frame of a possible length whose CRC fails, followed by an intact frame, the
      segment's end or a torn tail: a corrupt record, set aside, its length trusted;
    - anything else (an impossible length, a frame running past the end, a CRC failure
      followed by garbage): its length is not trusted; the bytes up to the next position
      where a frame's length and CRC both verify (`resynchronise`) are set aside;
    - no intact frame anywhere after it: a torn tail (a crash mid-write), skipped.
    The newest segment may still be growing: a CRC failure is set aside only when the
    frame after it is intact; anything else waits until the segment is sealed (the
    writer seals it when it rotates or restarts).
    """
    kind, end = _check_frame(data, 0, max_record_bytes)
    crc_failure = f"CRC mismatch in a {end - FRAME_HEADER_BYTES}-byte record"
    if kind == "crc":
        after, _ = _check_frame(data, end, max_record_bytes)
        if after == "ok" or (sealed and after in ("end", "short")):
            return Damage("set_aside", end, crc_failure)
    if not sealed:
        return Damage("wait", 0, "")
    intact = resynchronise(data, 1, max_record_bytes=max_record_bytes)
    if intact is not None:
        return Damage(
            "set_aside",
            intact,
            f"no intact frame here ({kind}); set aside up to the next intact frame",
        )
    if kind == "crc":
        # Nothing intact follows: keep the whole frame, skip only what is after it.
        return Damage("set_aside", end, crc_failure)
    return Damage("torn_tail", len(data), "")


def frame_boundary_at_or_before(data: bytes, offset: int, *, max_record_bytes: int) -> int:
    """Walk a segment as the reader reads it, from its header (`data` holds at least
    `offset` bytes of it, more when the file has them): `offset` when a frame ends there,
    else the last frame end before it. Damage is passed as the reader passed it, by the
    stretch it set aside (`diagnose_damage`): a length field alone, trusted, would leave
    a position after a damaged frame unreachable and resume before the damage."""
    if offset < SEGMENT_HEADER_BYTES:
        return offset
    pos = SEGMENT_HEADER_BYTES
    while pos < offset:
        kind, end = _check_frame(data, pos, max_record_bytes)
        if kind != "ok":
            damage = diagnose_damage(data[pos:], sealed=True, max_record_bytes=max_record_bytes)
            if damage.action != "set_aside":
                break
            end = pos + damage.length
        if end > offset:
            break
        pos = end
    return pos


class _VersionProbe(msgspec.Struct):
    version: int = CAPTURE_VERSION


_record_decoder = msgspec.msgpack.Decoder(CaptureRecord)
_probe_decoder = msgspec.msgpack.Decoder(_VersionProbe)


def decode_record(payload: bytes | memoryview, *, where: str) -> CaptureRecord:
    """Decode one CRC-checked payload; an unknown or undecodable record is a format error."""
    try:
        record = _record_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        try:
            version = _probe_decoder.decode(payload).version
        except msgspec.DecodeError:
            version = CAPTURE_VERSION
        if version != CAPTURE_VERSION:
            raise SpoolFormatError(
                f"{where}: unknown capture record version {version} "
                f"(this reader knows {CAPTURE_VERSION}); upgrade the agent"
            ) from exc
        raise UndecodableRecordError(f"{where}: undecodable capture record: {exc}") from exc
    if record.version != CAPTURE_VERSION:
        raise SpoolFormatError(
            f"{where}: unknown capture record version {record.version} "
            f"(this reader knows {CAPTURE_VERSION}); upgrade the agent"
        )
    return record


# ---- directory helpers -----------------------------------------------------------------


def _list_segments(directory: Path) -> dict[int, int]:
    """Sequence number -> size in bytes of every segment file."""
    segments: dict[int, int] = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            sequence = parse_segment_name(entry.name)
            if sequence is None:
                continue
            with contextlib.suppress(FileNotFoundError):  # deleted by the reader meanwhile
                segments[sequence] = entry.stat().st_size
    return segments


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _take_lock(directory: Path, name: str, role: str) -> int:
    fd = os.open(directory / name, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolBusyError(
            f"another {role} is using spool {directory} (holds {name}); "
            f"give each process its own spool directory"
        ) from None
    return fd


def quarantine_name(segment: int, offset: int) -> str:
    """One file per set-aside record, named by where it was: reading it again (after a
    rewind or a restart before the next commit) finds the file and adds nothing."""
    return f"{segment:0{_SEQUENCE_DIGITS}d}-{offset:0{_SEQUENCE_DIGITS}d}.json"


def encode_quarantine_entry(
    directory: Path, segment: int, offset: int, data: bytes, reason: str
) -> bytes:
    """The quarantine file: JSON, so an operator can read it; the raw bytes in base64,
    exactly as they stood in the segment (frame header included), so they can be
    inspected with `decode_quarantined` or repaired and written into a spool again."""
    return json.dumps(
        {
            "format": QUARANTINE_FORMAT_VERSION,
            "spool": str(directory),
            "segment": segment,
            "offset": offset,
            "length": len(data),
            "reason": reason,
            "set_aside_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "bytes": base64.b64encode(data).decode("ascii"),
        },
        indent=1,
    ).encode()


def decode_quarantined(entry: bytes) -> tuple[dict[str, object], bytes]:
    """A quarantine file -> (its fields without `bytes`, the raw bytes it holds)."""
    fields = json.loads(entry)
    if not isinstance(fields, dict) or fields.get("format") != QUARANTINE_FORMAT_VERSION:
        raise SpoolFormatError("not a spool quarantine file of a known format")
    raw = base64.b64decode(fields.pop("bytes"), validate=True)
    return fields, raw


def read_committed_position(directory: Path) -> SpoolPosition | None:
    try:
        raw = (directory / POSITION_FILE).read_bytes()
    except FileNotFoundError:
        return None
    try:
        stored = json.loads(raw)
        version, segment, offset = stored["format"], stored["segment"], stored["offset"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SpoolFormatError(f"{directory / POSITION_FILE}: unreadable: {exc}") from exc
    except RecursionError:
        raise SpoolFormatError(
            f"{directory / POSITION_FILE}: unreadable: not a position (JSON nested too deeply)"
        ) from None
    # `type(...) is int`: JSON true and 1.0 compare equal to 1 but are not numbers here.
    if type(version) is not int or version != POSITION_FORMAT_VERSION:
        raise SpoolFormatError(
            f"{directory / POSITION_FILE}: unknown position format version {version!r}"
        )
    if not (
        type(segment) is int
        and type(offset) is int
        and 0 <= segment <= MAX_SEGMENT_SEQUENCE
        and 0 <= offset < 2**63
    ):
        raise SpoolFormatError(
            f"{directory / POSITION_FILE}: segment and offset must be non-negative ints "
            f"(segment at most {MAX_SEGMENT_SEQUENCE}, offset below 2**63)"
        )
    return SpoolPosition(segment, offset)


# ---- writer ----------------------------------------------------------------------------


class SpoolWriter:
    """Appends capture records to a spool directory; one writer per directory."""

    def __init__(self, directory: str | os.PathLike[str], options: SpoolOptions) -> None:
        """Take the writer lock, start a fresh segment and the writer thread."""
        options.check()
        self.directory = Path(directory)
        self.options = options
        self.metrics = SpoolWriterMetrics()
        # Bound once: the hot path avoids attribute chains.
        self._encode = msgspec.msgpack.Encoder().encode
        self._max_bytes = options.max_bytes
        self._max_record_bytes = options.max_record_bytes
        self._flush_bytes = options.flush_bytes
        self._full_warning = _RateLimitedWarning(options.full_log_interval_s)

        # The hot path hands encoded records to the writer thread through a deque, whose
        # append and popleft are thread-safe, so appending takes no lock.
        self._queue: collections.deque[bytes] = collections.deque()
        self._closing = False
        self._kicked = False
        # Flush requests, guarded by _lock (rare, never on the hot path).
        self._lock = threading.Lock()
        self._flush_requests: list[concurrent.futures.Future[None]] = []
        # Loop-side queue of `append_wait` callers waiting for space, oldest first.
        self._waiters: collections.deque[tuple[bytes, asyncio.Future[None]]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = threading.Event()
        # For /readyz: why the last write failed, until a write succeeds again.
        self.last_write_error: str | None = None

        # Capture records are plaintext (principals, SQL): owner-only from the start.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = _take_lock(self.directory, WRITER_LOCK_FILE, "spool writer")
        try:
            for stale in self.directory.glob(".*.seg.tmp"):
                stale.unlink()
            existing = _list_segments(self.directory)
            committed = read_committed_position(self.directory)
            # Always a new segment: it seals whatever a crashed predecessor left half
            # written, so the reader can skip that torn tail and go on. Never reuse a
            # sequence the reader may already have committed past.
            last = max([*existing, committed.segment if committed else 0, 0])
            self._next_sequence = last + 1
            self.metrics.disk_bytes = sum(existing.values())
            self._segment_fd: int | None = None
            self._segment_size = 0
            self._open_segment()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._last_rescan = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, name=f"spool-writer:{self.directory}", daemon=True
        )
        self._thread.start()

    @property
    def is_full(self) -> bool:
        """True when a record of max_record_bytes would not fit (for /readyz and metrics)."""
        return not self._fits(FRAME_HEADER_BYTES + self._max_record_bytes)

    # -- hot path (event loop thread) --

    def _payload(self, record: CaptureRecord) -> bytes | None:
        if record.version != CAPTURE_VERSION:
            raise ValueError(f"spool writes capture record version {CAPTURE_VERSION} only")
        try:
            payload = self._encode(record)
        except UnicodeEncodeError:
            payload = self._encode(with_text_escaped(record))
        if len(payload) > self._max_record_bytes:
            self._drop_oversize(len(payload))
            return None
        return payload

    def _drop_oversize(self, size: int) -> Literal[False]:
        self.metrics.dropped_oversize += 1
        self._full_warning("spool: dropped a %d-byte capture record over max_record_bytes", size)
        return False

    def _fits(self, size: int) -> bool:
        metrics = self.metrics
        used = metrics.disk_bytes + metrics.appended_bytes - metrics.written_bytes
        return used + size <= self._max_bytes

    def _buffer(self, payload: bytes) -> None:
        """Hand a payload to the writer thread (call from the appending thread only)."""
        metrics = self.metrics
        self._queue.append(payload)
        metrics.appended += 1
        metrics.appended_bytes += len(payload) + FRAME_HEADER_BYTES
        if metrics.appended_bytes - metrics.written_bytes >= self._flush_bytes and not self._kicked:
            self._kicked = True
            self._wake.set()

    def append(self, record: CaptureRecord) -> bool:
        """Buffer a record without waiting. False: dropped (full under fail_open, or oversize).

        Call it from one thread (the event loop's). Under the `block` policy a full spool
        raises SpoolFullError; use `append_wait()`.
        """
        # The hot path: one encode, one deque append, no lock; `_fits` and `_buffer` are
        # written out here because a method call costs what they do. The writer thread
        # frames and checksums: measured, 2.3% less CPU per proxied request than here.
        if record.version != CAPTURE_VERSION:
            raise ValueError(f"spool writes capture record version {CAPTURE_VERSION} only")
        try:
            payload = self._encode(record)
        except UnicodeEncodeError:  # text that was not UTF-8: see with_text_escaped
            payload = self._encode(with_text_escaped(record))
        size = len(payload)
        if size > self._max_record_bytes:
            return self._drop_oversize(size)
        size += FRAME_HEADER_BYTES
        if self._closing:
            raise SpoolClosedError(f"spool writer {self.directory} is closed")
        metrics = self.metrics
        buffered = metrics.appended_bytes - metrics.written_bytes
        if self._waiters or metrics.disk_bytes + buffered + size > self._max_bytes:
            return self._on_full(payload)
        self._queue.append(payload)
        metrics.appended += 1
        metrics.appended_bytes += size
        if buffered + size >= self._flush_bytes and not self._kicked:
            self._kicked = True
            self._wake.set()
        return True

    def _on_full(self, payload: bytes) -> bool:
        if self.options.when_full == "block":
            raise SpoolFullError(f"spool {self.directory} is full; use append_wait()")
        self.metrics.dropped_full += 1
        self._full_warning(
            "spool %s full (%d bytes): dropping capture records (fail_open), %d dropped so far",
            self.directory,
            self.options.max_bytes,
            self.metrics.dropped_full,
        )
        return False

    async def append_wait(self, record: CaptureRecord) -> bool:
        """Like `append()`, but under the `block` policy waits (in order) for space."""
        payload = self._payload(record)
        if payload is None:
            return False
        if self._closing:
            raise SpoolClosedError(f"spool writer {self.directory} is closed")
        if not self._waiters and self._fits(len(payload) + FRAME_HEADER_BYTES):
            self._buffer(payload)
            return True
        if self.options.when_full == "fail_open":
            return self._on_full(payload)
        self._loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append((payload, waiter))
        self.metrics.blocked += 1
        self._full_warning(
            "spool %s full (%d bytes): requests wait for the agent to catch up (block)",
            self.directory,
            self.options.max_bytes,
        )
        self._wake.set()
        await waiter
        return True

    def _admit_waiters(self) -> None:
        """On the loop: move waiting records into the buffer while they fit, in order."""
        while self._waiters and not self._closing:  # closing: _fail_waiters answers
            payload, waiter = self._waiters[0]
            if waiter.done():  # the waiting request was cancelled
                self._waiters.popleft()
                continue
            if not self._fits(len(payload) + FRAME_HEADER_BYTES):
                break
            self._waiters.popleft()
            self._buffer(payload)
            waiter.set_result(None)

    def _fail_waiters(self) -> None:
        waiters, self._waiters = self._waiters, collections.deque()
        for _payload, waiter in waiters:
            if not waiter.done():
                waiter.set_exception(SpoolClosedError(f"spool writer {self.directory} closed"))

    # -- flushing and closing --

    def _request_flush(self) -> concurrent.futures.Future[None]:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            if self._closing and not self._thread.is_alive():
                done.set_result(None)
                return done
            self._flush_requests.append(done)
        self._wake.set()
        return done

    def flush(self, timeout: float | None = None) -> None:
        """Block until every record appended so far is written and fsynced."""
        self._request_flush().result(timeout)

    async def flush_async(self) -> None:
        """`flush()` for the event loop: waits without blocking it."""
        await asyncio.wrap_future(self._request_flush())

    def close(self) -> None:
        """Write and fsync everything buffered, stop the thread, release the directory."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if self._waiters and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._fail_waiters)
        self._wake.set()
        self._thread.join()
        with self._lock:
            late, self._flush_requests = self._flush_requests, []
        for request in late:  # asked for while closing: close() flushed them
            if not request.done():
                request.set_result(None)
        if self._segment_fd is not None:
            os.close(self._segment_fd)
            self._segment_fd = None
        os.close(self._lock_fd)

    async def aclose(self) -> None:
        """`close()` for the event loop."""
        self._fail_waiters()
        await asyncio.to_thread(self.close)

    # -- writer thread --

    def _run(self) -> None:
        pending: list[bytes] = []
        requests: list[concurrent.futures.Future[None]] = []
        queue = self._queue
        while True:
            # A fixed cadence, not a longer idle sleep: a record appended to an empty
            # buffer must not wait longer than flush_interval_s, and waking the thread
            # on that transition would put an Event.set() on the hot path.
            self._wake.wait(self.options.flush_interval_s)
            self._wake.clear()
            self._kicked = False
            # Requests first, then frames: a flush covers every frame appended before it.
            with self._lock:
                requests.extend(self._flush_requests)
                self._flush_requests = []
                closing = self._closing
            popleft = queue.popleft
            # Framed here, not on the request path: the CRC tables stay in this thread's
            # cache across the batch instead of being fetched again for every request.
            pending += map(encode_frame, [popleft() for _ in range(len(queue))])
            if pending:
                try:
                    written = self._write(pending)
                except OSError as exc:
                    self.metrics.write_errors += 1
                    self.last_write_error = f"{type(exc).__name__}: {exc}"
                    log.error("spool %s: write failed, will retry: %s", self.directory, exc)
                    self._abandon_segment()
                    if closing:
                        self._give_up(pending, requests, exc)
                        return
                    time.sleep(min(1.0, self.options.flush_interval_s * 10))
                    continue
                self.last_write_error = None
                self.metrics.written_bytes += written
                self.metrics.flushed_records += len(pending)
                pending = []
            for request in requests:
                request.set_result(None)
            requests = []
            self._maybe_rescan()
            if self._waiters and self._loop is not None:
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._admit_waiters)
            if closing and not queue:
                return

    def _give_up(
        self,
        pending: list[bytes],
        requests: list[concurrent.futures.Future[None]],
        exc: OSError,
    ) -> None:
        log.error(
            "spool %s: closing with %d capture records that could not be written: %s",
            self.directory,
            len(pending),
            exc,
        )
        for request in requests:
            request.set_exception(exc)

    def _write(self, frames: list[bytes]) -> int:
        """Append frames, rotating so no segment exceeds segment_bytes, then fdatasync.
        Returns the bytes written."""
        if self._segment_fd is None:
            self._open_segment()
        limit = self.options.segment_bytes
        total = sum(map(len, frames))
        if self._segment_size + total <= limit:
            # The usual case, without a Python step per frame: all fit in this segment.
            _write_all(self._require_fd(), b"".join(frames))
            self.metrics.disk_bytes += total
            self._segment_size += total
            os.fdatasync(self._require_fd())
            self.metrics.fsyncs += 1
            return total
        start = 0
        while start < len(frames):
            end, size = start, self._segment_size
            while end < len(frames) and size + len(frames[end]) <= limit:
                size += len(frames[end])
                end += 1
            if end == start:
                self._rotate()
                continue
            _write_all(self._require_fd(), b"".join(frames[start:end]))
            self.metrics.disk_bytes += size - self._segment_size
            self._segment_size = size
            start = end
        os.fdatasync(self._require_fd())
        self.metrics.fsyncs += 1
        return total

    def _require_fd(self) -> int:
        if self._segment_fd is None:
            raise OSError("spool segment is not open")
        return self._segment_fd

    def _rotate(self) -> None:
        # The full segment is made durable before its successor exists: after a crash
        # the newer segment never holds records that an older one lost.
        fd = self._require_fd()
        os.fdatasync(fd)
        self.metrics.fsyncs += 1
        os.close(fd)
        self._segment_fd = None
        self._open_segment()

    def _abandon_segment(self) -> None:
        """After a failed write: seal the segment (its tail may be torn) and retry anew."""
        if self._segment_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._segment_fd)
            self._segment_fd = None

    def _open_segment(self) -> None:
        sequence = self._next_sequence
        self._next_sequence += 1
        final = self.directory / segment_name(sequence)
        temp = self.directory / f".{segment_name(sequence)}.tmp"
        # Header written, fsynced and renamed into place: a segment file that exists
        # always starts with a whole header.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, encode_segment_header(sequence))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, final)
        _fsync_directory(self.directory)
        self._segment_fd = os.open(final, os.O_WRONLY | os.O_APPEND)
        self._segment_size = SEGMENT_HEADER_BYTES
        self.metrics.disk_bytes += SEGMENT_HEADER_BYTES
        self.metrics.segments_created += 1

    def _maybe_rescan(self) -> None:
        """Learn what the reader deleted: often when near full, else once a second."""
        metrics = self.metrics
        near_full = metrics.disk_bytes + metrics.buffered_bytes > self.options.max_bytes // 2
        now = time.monotonic()
        if near_full or self._waiters or now - self._last_rescan >= 1.0:
            self._last_rescan = now
            metrics.disk_bytes = sum(_list_segments(self.directory).values())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# ---- reader ----------------------------------------------------------------------------

_READ_CHUNK_BYTES = 1 << 20
_START = SpoolPosition(-1, 0)  # before the first segment


class SpoolReader:
    """Reads a spool directory in order and stores its position on commit; one per directory."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_record_bytes: int = RECORD_BYTES_LIMIT,
    ) -> None:
        """Take the reader lock and resume just after the last committed position."""
        self.directory = Path(directory)
        self.metrics = SpoolReaderMetrics()
        self._max_record_bytes = max_record_bytes
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = _take_lock(self.directory, READER_LOCK_FILE, "spool reader")
        try:
            self._committed = self._at_frame_boundary(read_committed_position(self.directory))
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._fd: int | None = None
        self._segment = -1
        self._offset = 0
        self._read_position = _START
        self._deferred_error: SpoolFormatError | None = None
        self.rewind()
        self._delete_delivered()

    @property
    def committed_position(self) -> SpoolPosition | None:
        return self._committed

    def rewind(self) -> None:
        """Forget what was read but not committed; the next read starts after the commit."""
        self._close_segment()
        start = self._committed or _START
        self._segment, self._offset = start
        self._read_position = start
        self._deferred_error = None

    def read_batch(self, max_records: int = 1000) -> list[tuple[SpoolPosition, CaptureRecord]]:
        """Return up to max_records next records (possibly none), each with its position.

        Does blocking file IO: call it from a thread (see `read`) when on an event loop.
        """
        if self._deferred_error is not None:
            raise self._deferred_error
        batch: list[tuple[SpoolPosition, CaptureRecord]] = []
        try:
            while len(batch) < max_records:
                segments = _list_segments(self.directory)
                if not self._open_current(segments):
                    break
                # Sealed is decided before reading: the writer finishes a segment before
                # it creates the next, so what we read afterwards is all there will be.
                sealed = any(sequence > self._segment for sequence in segments)
                stop = self._read_segment(batch, max_records, sealed=sealed)
                if stop == "limit" or not sealed:
                    break
                self._close_segment()
                if not batch and self._read_position == (self._committed or _START):
                    # Passed a sealed segment with nothing uncommitted in it (it was
                    # empty, or its records were committed before it was sealed).
                    self._delete_segment(self._segment)
                self._segment, self._offset = self._segment + 1, 0
        except SpoolFormatError as exc:
            if not batch:
                raise
            # Deliver what came before the bad record; the next call reports it.
            self._deferred_error = exc
        if batch:
            self._read_position = batch[-1][0]
            self.metrics.records_read += len(batch)
        return batch

    async def read(
        self, max_records: int = 1000, *, wait_s: float = 0.0, poll_interval_s: float = 0.05
    ) -> list[tuple[SpoolPosition, CaptureRecord]]:
        """Tail the spool: wait up to wait_s for at least one record, without blocking the loop."""
        deadline = time.monotonic() + wait_s
        while True:
            batch = await self._read_in_thread(max_records)
            if batch or time.monotonic() >= deadline:
                return batch
            await asyncio.sleep(poll_interval_s)

    async def _read_in_thread(self, max_records: int) -> list[tuple[SpoolPosition, CaptureRecord]]:
        # A cancelled caller never sees the records the thread read; if the reader kept
        # its advanced position, a later commit would mark them delivered. Put it back.
        before = (self._segment, self._offset, self._read_position)
        reading = asyncio.ensure_future(asyncio.to_thread(self.read_batch, max_records))
        try:
            return await asyncio.shield(reading)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await reading
            self._close_segment()
            self._segment, self._offset, self._read_position = before
            raise

    def commit(self, position: SpoolPosition) -> None:
        """Durably record that everything up to `position` was delivered; delete spent segments."""
        if self._committed is not None and position < self._committed:
            raise ValueError(f"commit {position} is before the committed {self._committed}")
        if position > self._read_position:
            raise ValueError(f"commit {position} is past what was read ({self._read_position})")
        target = self.directory / POSITION_FILE
        temp = self.directory / f".{POSITION_FILE}.tmp"
        encoded = json.dumps(
            {
                "format": POSITION_FORMAT_VERSION,
                "segment": position.segment,
                "offset": position.offset,
            }
        ).encode()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, encoded)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, target)
        _fsync_directory(self.directory)
        self._committed = SpoolPosition(*position)
        self.metrics.commits += 1
        self._delete_delivered()

    async def commit_async(self, position: SpoolPosition) -> None:
        await asyncio.to_thread(self.commit, position)

    def close(self) -> None:
        """Release the directory. Does not commit: what was not committed is read again."""
        self._close_segment()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __del__(self) -> None:
        # A reader dropped without close() (a crashed agent in tests) frees its lock.
        with contextlib.suppress(Exception):
            self.close()

    # -- internals --

    def _at_frame_boundary(self, committed: SpoolPosition | None) -> SpoolPosition | None:
        """A committed position always ends a frame. One that does not (a position file
        edited or damaged) would make the reader take the middle of a record for a frame
        header; resuming from the last frame end before it instead re-delivers at most
        the records in between, which the store keeps once, and loses nothing."""
        if committed is None or committed.offset <= SEGMENT_HEADER_BYTES:
            return committed
        try:
            fd = os.open(self.directory / segment_name(committed.segment), os.O_RDONLY)
        except FileNotFoundError:
            return committed  # delivered and deleted: reading starts at the next segment
        try:
            # Never more than the file holds: the offset may be anything up to 2**63. What
            # follows the offset is read as `_recover` reads it, to judge damage the same way.
            lookahead = 2 * (FRAME_HEADER_BYTES + self._max_record_bytes)
            data = os.pread(fd, min(committed.offset + lookahead, os.fstat(fd).st_size), 0)
        finally:
            os.close(fd)
        boundary = frame_boundary_at_or_before(
            data, committed.offset, max_record_bytes=self._max_record_bytes
        )
        if boundary == committed.offset:
            return committed
        log.warning(
            "spool %s: committed offset %d of segment %d is not the end of a frame; "
            "resuming from %d, the last frame end before it (records in between may be "
            "delivered again; the store keeps each event once)",
            self.directory,
            committed.offset,
            committed.segment,
            boundary,
        )
        return SpoolPosition(committed.segment, boundary)

    def _delete_delivered(self) -> None:
        if self._committed is None:
            return
        segments = _list_segments(self.directory)
        if not segments:
            return
        newest = max(segments)
        spent = [
            sequence
            for sequence, size in segments.items()
            if sequence != newest
            and (
                sequence < self._committed.segment
                or (sequence == self._committed.segment and size <= self._committed.offset)
            )
        ]
        for sequence in spent:
            self._delete_segment(sequence)

    def _delete_segment(self, sequence: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / segment_name(sequence)).unlink()
            self.metrics.segments_deleted += 1

    def _open_current(self, segments: dict[int, int]) -> bool:
        """Open the segment holding the read position, or the next one; False if none."""
        if self._fd is not None:
            return True
        while True:
            if self._segment not in segments:
                later = [sequence for sequence in segments if sequence > self._segment]
                if not later:
                    return False
                self._segment, self._offset = min(later), 0
            path = self.directory / segment_name(self._segment)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return False
            header = os.pread(fd, SEGMENT_HEADER_BYTES, 0)
            if len(header) == SEGMENT_HEADER_BYTES:
                break
            os.close(fd)
            # The writer renames a segment into place only with its header written, so
            # this is a crash of some other writer between create and header write: no
            # records, not corruption. Once a newer segment exists none will follow.
            if not any(sequence > self._segment for sequence in segments):
                return False
            log.warning(
                "spool %s: segment %d has no complete header (%d bytes): skipped and deleted",
                self.directory,
                self._segment,
                len(header),
            )
            self.metrics.empty_segments_skipped += 1
            self._delete_segment(self._segment)
            del segments[self._segment]
        try:
            parse_segment_header(header, expected_sequence=self._segment, where=str(path))
        except SpoolFormatError:
            os.close(fd)
            raise
        self._fd = fd
        self._offset = max(self._offset, SEGMENT_HEADER_BYTES)
        return True

    def _read_segment(
        self, batch: list[tuple[SpoolPosition, CaptureRecord]], max_records: int, *, sealed: bool
    ) -> FrameStop:
        fd = self._fd
        assert fd is not None
        read_size = _READ_CHUNK_BYTES
        # Named in errors only, but built per record it cost as much as decoding one.
        segment_path = str(self.directory / segment_name(self._segment))
        while len(batch) < max_records:
            available = os.fstat(fd).st_size - self._offset
            if available <= 0:
                return "end"
            data = os.pread(fd, min(available, read_size), self._offset)
            scan = scan_frames(
                data,
                max_record_bytes=self._max_record_bytes,
                max_frames=max_records - len(batch),
            )
            chunk_start = self._offset
            for end, payload in scan.frames:
                frame_at = self._offset
                self._offset = chunk_start + end
                try:
                    record = decode_record(payload, where=f"{segment_path} at {frame_at}")
                except UndecodableRecordError as exc:
                    self._quarantine(frame_at, data[frame_at - chunk_start : end], str(exc))
                    continue
                batch.append((SpoolPosition(self._segment, self._offset), record))
            if scan.stop == "limit":
                continue  # full, unless frames were set aside: then read on
            if scan.stop == "short" and scan.needed <= available - scan.consumed:
                read_size = max(read_size, scan.needed)
            elif scan.stop == "short" and not sealed:
                return "short"  # not written yet (or torn, if the writer died)
            elif scan.stop != "end" and not self._recover(fd, sealed=sealed):
                return "corrupt"  # wait: the writer may still be writing this segment
        return "limit"

    def _recover(self, fd: int, *, sealed: bool) -> bool:
        """No intact frame starts at the read offset: set aside, skip a torn tail, or
        (False) wait for the writer."""
        size = os.fstat(fd).st_size
        # The newest segment is judged by the frame and the one after it only.
        want = size - self._offset if sealed else 2 * (FRAME_HEADER_BYTES + self._max_record_bytes)
        data = os.pread(fd, min(want, size - self._offset), self._offset)
        damage = diagnose_damage(data, sealed=sealed, max_record_bytes=self._max_record_bytes)
        if damage.action == "wait":
            return False
        if damage.action == "set_aside":
            where = self.directory / segment_name(self._segment)
            self._quarantine(
                self._offset, data[: damage.length], f"{where} at {self._offset}: {damage.reason}"
            )
        else:
            self._skip_torn_tail()
        self._offset += damage.length
        return True

    def _quarantine(self, offset: int, data: bytes, reason: str) -> None:
        """Set bytes of the current segment aside, durably, before reading past them: the
        segment is deleted once later records are committed."""
        directory = self.directory / QUARANTINE_DIR
        path = directory / quarantine_name(self._segment, offset)
        if path.exists():
            return  # set aside by an earlier read of the same (uncommitted) stretch
        directory.mkdir(mode=0o700, exist_ok=True)
        temp = directory / f".{path.name}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(
                fd, encode_quarantine_entry(self.directory, self._segment, offset, data, reason)
            )
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, path)
        _fsync_directory(directory)
        self.metrics.records_quarantined += 1
        self.metrics.bytes_quarantined += len(data)
        log.error(
            "spool %s: set aside %d bytes at segment %d offset %d in %s and went on: %s",
            self.directory,
            len(data),
            self._segment,
            offset,
            path,
            reason,
        )

    def _skip_torn_tail(self) -> None:
        fd = self._fd
        assert fd is not None
        skipped = os.fstat(fd).st_size - self._offset
        self.metrics.torn_tails_skipped += 1
        self.metrics.bytes_skipped += skipped
        log.warning(
            "spool %s: skipped %d bytes of a torn or corrupt tail in sealed segment %d at %d",
            self.directory,
            skipped,
            self._segment,
            self._offset,
        )

    def _close_segment(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
