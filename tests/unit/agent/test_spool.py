"""Spool: round trips, restarts, torn frames, versions, the byte budget and rotation."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from agent.capture import CaptureRecord
from agent.spool import (
    QUARANTINE_DIR,
    SEGMENT_HEADER_BYTES,
    SpoolBusyError,
    SpoolFormatError,
    SpoolFullError,
    SpoolOptions,
    SpoolPosition,
    SpoolReader,
    SpoolWriter,
    decode_quarantined,
    encode_frame,
    encode_segment_header,
    segment_name,
)

# Flushes happen only when a test asks, so what the reader can see is deterministic.
MANUAL_FLUSH = SpoolOptions(flush_interval_s=3600, flush_bytes=1 << 30)
SMALL_SEGMENTS = SpoolOptions(
    segment_bytes=4096,
    max_bytes=1 << 20,
    max_record_bytes=1024,
    flush_interval_s=3600,
    flush_bytes=1 << 30,
)


def make_record(index: int, *, sql: str | None = None) -> CaptureRecord:
    return CaptureRecord(
        request_id=f"req-{index}",
        time_ns=1_764_000_000_000_000_000 + index,
        service="https://sales-db.internal:8001",
        principal="alice",
        roles=("analyst",),
        method="GET",
        path=f"/sales/orders/{index}",
        status=200,
        sql=sql,
    )


def ids(batch: list[tuple[SpoolPosition, CaptureRecord]]) -> list[str]:
    return [record.request_id for _position, record in batch]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[SpoolWriter]:
    spool = SpoolWriter(tmp_path, MANUAL_FLUSH)
    yield spool
    spool.close()


def read_all(reader: SpoolReader) -> list[tuple[SpoolPosition, CaptureRecord]]:
    out: list[tuple[SpoolPosition, CaptureRecord]] = []
    while batch := reader.read_batch(100):
        out.extend(batch)
    return out


def test_round_trip_returns_records_in_order(tmp_path: Path, writer: SpoolWriter) -> None:
    records = [make_record(i, sql="SELECT 1" if i % 2 else None) for i in range(250)]
    for record in records:
        assert writer.append(record)
    writer.flush()
    reader = SpoolReader(tmp_path)
    delivered = read_all(reader)
    assert [record for _position, record in delivered] == records
    positions = [position for position, _record in delivered]
    assert positions == sorted(positions)
    assert writer.metrics.appended == 250
    assert writer.metrics.flushed_records == 250
    reader.close()


def test_reader_sees_nothing_before_flush(tmp_path: Path, writer: SpoolWriter) -> None:
    writer.append(make_record(0))
    reader = SpoolReader(tmp_path)
    assert reader.read_batch() == []
    writer.flush()
    assert ids(reader.read_batch()) == ["req-0"]
    reader.close()


def test_restarted_reader_resumes_right_after_commit(tmp_path: Path, writer: SpoolWriter) -> None:
    for i in range(20):
        writer.append(make_record(i))
    writer.flush()
    reader = SpoolReader(tmp_path)
    batch = reader.read_batch(10)
    reader.commit(batch[5][0])  # delivered req-0 .. req-5
    reader.close()

    reader = SpoolReader(tmp_path)
    assert reader.committed_position == batch[5][0]
    assert ids(read_all(reader)) == [f"req-{i}" for i in range(6, 20)]
    reader.close()


def test_uncommitted_records_are_delivered_again_after_a_crash(
    tmp_path: Path, writer: SpoolWriter
) -> None:
    for i in range(10):
        writer.append(make_record(i))
    writer.flush()
    reader = SpoolReader(tmp_path)
    first = reader.read_batch(4)
    reader.commit(first[-1][0])
    assert ids(reader.read_batch(100)) == [f"req-{i}" for i in range(4, 10)]
    del reader  # crashed: no commit, no close
    gc.collect()

    reader = SpoolReader(tmp_path)
    assert ids(read_all(reader)) == [f"req-{i}" for i in range(4, 10)]
    reader.close()


def test_rewind_redelivers_what_was_not_committed(tmp_path: Path, writer: SpoolWriter) -> None:
    for i in range(5):
        writer.append(make_record(i))
    writer.flush()
    reader = SpoolReader(tmp_path)
    reader.commit(reader.read_batch(2)[-1][0])
    reader.read_batch(10)
    reader.rewind()  # the sink failed: send the same records again
    assert ids(reader.read_batch(10)) == ["req-2", "req-3", "req-4"]
    reader.close()


def test_commit_rejects_positions_not_read_or_moving_back(
    tmp_path: Path, writer: SpoolWriter
) -> None:
    for i in range(3):
        writer.append(make_record(i))
    writer.flush()
    reader = SpoolReader(tmp_path)
    batch = reader.read_batch(2)
    with pytest.raises(ValueError, match="past what was read"):
        reader.commit(SpoolPosition(batch[-1][0].segment, batch[-1][0].offset + 1))
    reader.commit(batch[1][0])
    with pytest.raises(ValueError, match="before the committed"):
        reader.commit(batch[0][0])
    reader.close()


def test_torn_last_frame_is_never_returned_and_does_not_stop_later_segments(
    tmp_path: Path,
) -> None:
    writer = SpoolWriter(tmp_path, MANUAL_FLUSH)
    for i in range(10):
        writer.append(make_record(i))
    writer.close()
    [segment] = segment_files(tmp_path)
    # A crash mid-write: the last frame is cut short and followed by junk.
    with segment.open("r+b") as handle:
        handle.truncate(segment.stat().st_size - 3)
        handle.seek(0, os.SEEK_END)
        handle.write(b"\xde\xad\xbe\xef" * 8)

    reader = SpoolReader(tmp_path)
    assert ids(read_all(reader)) == [f"req-{i}" for i in range(9)]

    # The restarted proxy writes on in a new segment; the reader skips the torn tail.
    writer = SpoolWriter(tmp_path, MANUAL_FLUSH)
    for i in range(10, 13):
        writer.append(make_record(i))
    writer.flush()
    assert ids(read_all(reader)) == ["req-10", "req-11", "req-12"]
    assert reader.metrics.torn_tails_skipped == 1
    writer.close()
    reader.close()


def test_flipped_byte_inside_a_frame_is_not_returned(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path, MANUAL_FLUSH)
    for i in range(3):
        writer.append(make_record(i))
    writer.close()
    [segment] = segment_files(tmp_path)
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0x40  # inside the last record's payload
    segment.write_bytes(bytes(data))
    writer = SpoolWriter(tmp_path, MANUAL_FLUSH)  # seals the damaged segment
    writer.append(make_record(3))
    writer.close()

    reader = SpoolReader(tmp_path)
    assert ids(read_all(reader)) == ["req-0", "req-1", "req-3"]
    # The damaged frame is the last of its (sealed) segment: set aside, not skipped.
    [(fields, raw)] = quarantined(tmp_path)
    offset = fields["offset"]
    assert isinstance(offset, int)
    assert raw == bytes(data[offset:])
    assert "CRC mismatch" in str(fields["reason"])
    reader.close()


def write_segment(directory: Path, sequence: int, header: bytes, frames: list[bytes]) -> None:
    (directory / segment_name(sequence)).write_bytes(header + b"".join(frames))


def test_unknown_segment_format_version_is_refused(tmp_path: Path) -> None:
    payload = msgspec.msgpack.encode(make_record(0))
    write_segment(tmp_path, 1, encode_segment_header(1, format_version=2), [encode_frame(payload)])
    reader = SpoolReader(tmp_path)
    with pytest.raises(SpoolFormatError, match="unknown spool segment format version 2"):
        reader.read_batch()
    reader.close()


def test_unknown_record_version_in_segment_header_is_refused(tmp_path: Path) -> None:
    payload = msgspec.msgpack.encode(make_record(0))
    write_segment(tmp_path, 1, encode_segment_header(1, record_version=7), [encode_frame(payload)])
    reader = SpoolReader(tmp_path)
    with pytest.raises(SpoolFormatError, match="unknown capture record version 7"):
        reader.read_batch()
    reader.close()


def test_unknown_record_version_in_payload_is_refused_after_earlier_records(
    tmp_path: Path,
) -> None:
    good = msgspec.msgpack.encode(make_record(0))
    # A future record: another version and a field this reader types differently.
    future = msgspec.msgpack.encode(
        {"version": 2, "request_id": "req-1", "time_ns": "soon", "status": 200}
    )
    write_segment(tmp_path, 1, encode_segment_header(1), [encode_frame(good), encode_frame(future)])
    reader = SpoolReader(tmp_path)
    assert ids(reader.read_batch()) == ["req-0"]
    with pytest.raises(SpoolFormatError, match="unknown capture record version 2"):
        reader.read_batch()
    reader.close()


def quarantined(directory: Path) -> list[tuple[dict[str, object], bytes]]:
    return [
        decode_quarantined(path.read_bytes())
        for path in sorted((directory / QUARANTINE_DIR).glob("*.json"))
    ]


def test_undecodable_record_is_set_aside_and_the_records_around_it_delivered(
    tmp_path: Path,
) -> None:
    good = [encode_frame(msgspec.msgpack.encode(make_record(i))) for i in range(3)]
    # CRC intact, version 1, but `decision` is not a value this reader knows.
    maybe = {"request_id": "bad", "time_ns": 1, "service": "s", "method": "GET", "path": "/"}
    bad = encode_frame(msgspec.msgpack.encode({**maybe, "status": 200, "decision": "maybe"}))
    write_segment(tmp_path, 1, encode_segment_header(1), [good[0], good[1], bad, good[2]])
    reader = SpoolReader(tmp_path)
    delivered = read_all(reader)
    assert ids(delivered) == ["req-0", "req-1", "req-2"]
    [(fields, raw)] = quarantined(tmp_path)
    assert raw == bad  # the frame exactly as it was, header included
    assert fields["segment"] == 1
    assert fields["offset"] == SEGMENT_HEADER_BYTES + len(good[0]) + len(good[1])
    assert "undecodable capture record" in str(fields["reason"])
    assert "decision" in str(fields["reason"])
    assert reader.metrics.records_quarantined == 1
    assert (tmp_path / QUARANTINE_DIR).stat().st_mode & 0o777 == 0o700

    # A batch is not cut short by a record set aside: an empty batch means drained.
    reader.rewind()
    assert ids(reader.read_batch(2)) == ["req-0", "req-1"]
    assert ids(reader.read_batch(1)) == ["req-2"]
    # Read again before a commit (a refused batch, a restart): set aside once, not twice.
    reader.rewind()
    assert ids(read_all(reader)) == ["req-0", "req-1", "req-2"]
    assert reader.metrics.records_quarantined == 1
    assert len(quarantined(tmp_path)) == 1
    reader.close()


def test_segment_without_a_complete_header_is_skipped_and_deleted(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path, MANUAL_FLUSH)
    writer.append(make_record(0))
    writer.close()
    # A crash between creating a segment and writing its header: zero bytes, or a few.
    (tmp_path / segment_name(2)).write_bytes(b"")
    (tmp_path / segment_name(3)).write_bytes(encode_segment_header(3)[:10])
    reader = SpoolReader(tmp_path)
    assert ids(read_all(reader)) == ["req-0"]  # the newest one is simply empty so far
    writer = SpoolWriter(tmp_path, MANUAL_FLUSH)
    writer.append(make_record(1))
    writer.close()
    assert ids(read_all(reader)) == ["req-1"]
    assert not (tmp_path / segment_name(2)).exists()
    assert not (tmp_path / segment_name(3)).exists()
    assert reader.metrics.empty_segments_skipped == 2
    reader.close()


def test_foreign_file_named_like_a_segment_is_refused(tmp_path: Path) -> None:
    (tmp_path / segment_name(1)).write_bytes(b"GIF89a" + bytes(SEGMENT_HEADER_BYTES))
    reader = SpoolReader(tmp_path)
    with pytest.raises(SpoolFormatError, match="not a spool segment"):
        reader.read_batch()
    reader.close()


def test_unknown_position_file_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / "reader.position").write_text('{"format": 9, "segment": 1, "offset": 24}')
    with pytest.raises(SpoolFormatError, match="unknown position format version 9"):
        SpoolReader(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[" * 100_000, "unreadable: not a position \\(JSON nested too deeply\\)"),
        ('{"format": true, "segment": 1, "offset": 24}', "unknown position format version True"),
        ('{"format": 1, "segment": true, "offset": 24}', "must be non-negative ints"),
        ('{"format": 1, "segment": 1, "offset": -5}', "must be non-negative ints"),
        ('{"format": 1, "segment": 18446744073709551615, "offset": 24}', "at most"),
        ('{"format": 1, "segment": 1, "offset": 9223372036854775808}', r"below 2\*\*63"),
        ('{"format": 1, "segment": 1}', "unreadable"),
    ],
)
def test_malformed_position_file_is_a_format_error(
    tmp_path: Path, content: str, message: str
) -> None:
    (tmp_path / "reader.position").write_text(content)
    with pytest.raises(SpoolFormatError, match=message):
        SpoolReader(tmp_path)
    # The lock was let go: once the file is fixed, a reader starts.
    (tmp_path / "reader.position").unlink()
    SpoolReader(tmp_path).close()


def test_writer_refuses_a_record_version_it_does_not_write(writer: SpoolWriter) -> None:
    future = msgspec.structs.replace(make_record(0), version=2)
    with pytest.raises(ValueError, match="version 1 only"):
        writer.append(future)


def test_second_writer_or_reader_on_one_directory_is_refused(
    tmp_path: Path, writer: SpoolWriter
) -> None:
    with pytest.raises(SpoolBusyError, match="another spool writer"):
        SpoolWriter(tmp_path, MANUAL_FLUSH)
    reader = SpoolReader(tmp_path)
    with pytest.raises(SpoolBusyError, match="another spool reader"):
        SpoolReader(tmp_path)
    reader.close()


def test_oversize_record_is_dropped_and_counted(writer: SpoolWriter) -> None:
    huge = make_record(0, sql="x" * (MANUAL_FLUSH.max_record_bytes + 1))
    assert writer.append(huge) is False
    assert writer.metrics.dropped_oversize == 1
    assert writer.append(make_record(1))


def test_options_that_cannot_work_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes must be at least twice"):
        SpoolWriter(tmp_path, SpoolOptions(max_bytes=3 << 20, segment_bytes=2 << 20))


def test_segments_rotate_and_delivered_ones_are_deleted(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path, SMALL_SEGMENTS)
    for i in range(300):
        writer.append(make_record(i))
    writer.flush()
    segments = segment_files(tmp_path)
    assert len(segments) > 5
    assert all(path.stat().st_size <= SMALL_SEGMENTS.segment_bytes for path in segments)

    reader = SpoolReader(tmp_path)
    delivered = read_all(reader)
    assert ids(delivered) == [f"req-{i}" for i in range(300)]
    reader.commit(delivered[150][0])
    remaining = segment_files(tmp_path)
    assert remaining[0].name == segment_name(delivered[150][0].segment)
    reader.commit(delivered[-1][0])
    # Only the newest segment stays: the writer may still be appending to it.
    assert segment_files(tmp_path) == [segments[-1]]
    assert reader.metrics.segments_deleted == len(segments) - 1
    writer.close()
    reader.close()


def test_writer_restart_after_everything_was_deleted_is_still_read(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path, SMALL_SEGMENTS)
    for i in range(3):
        writer.append(make_record(i))
    writer.close()
    reader = SpoolReader(tmp_path)
    reader.commit(read_all(reader)[-1][0])
    for path in segment_files(tmp_path):  # an operator cleans the directory
        path.unlink()
    writer = SpoolWriter(tmp_path, SMALL_SEGMENTS)
    writer.append(make_record(3))
    writer.close()
    assert ids(read_all(reader)) == ["req-3"]
    reader.close()


def has_room(writer: SpoolWriter, size: int) -> bool:
    metrics = writer.metrics
    return metrics.disk_bytes + metrics.buffered_bytes + size <= writer.options.max_bytes


FULL_FAIL_OPEN = SpoolOptions(
    segment_bytes=2048,
    max_bytes=4096,
    max_record_bytes=512,
    flush_interval_s=0.005,
    flush_bytes=1 << 30,
    when_full="fail_open",
)


def test_full_spool_under_fail_open_drops_counts_and_recovers(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path, FULL_FAIL_OPEN)
    accepted = 0
    while writer.append(make_record(accepted)):
        accepted += 1
    assert writer.metrics.dropped_full == 1
    for _ in range(5):  # traffic keeps flowing: no exception, just drops
        assert writer.append(make_record(10_000)) is False
    assert writer.metrics.dropped_full == 6
    assert writer.is_full
    writer.flush()
    on_disk = sum(path.stat().st_size for path in segment_files(tmp_path))
    assert on_disk <= FULL_FAIL_OPEN.max_bytes

    reader = SpoolReader(tmp_path)
    delivered = read_all(reader)
    assert ids(delivered) == [f"req-{i}" for i in range(accepted)]
    reader.commit(delivered[-1][0])
    # The writer notices the freed space on its next cycle.
    for _ in range(2000):
        writer.flush()
        if writer.append(make_record(accepted)):
            break
    else:
        pytest.fail("the writer never saw the space the reader freed")
    assert not writer.is_full
    writer.close()
    assert ids(read_all(reader)) == [f"req-{accepted}"]
    reader.close()


async def test_full_spool_under_block_waits_until_the_reader_frees_space(
    tmp_path: Path,
) -> None:
    options = msgspec.structs.replace(FULL_FAIL_OPEN, when_full="block")
    writer = SpoolWriter(tmp_path, options)
    accepted = 0
    while has_room(writer, 200):
        await writer.append_wait(make_record(accepted))
        accepted += 1
    waiting = [asyncio.create_task(writer.append_wait(make_record(accepted + i))) for i in range(3)]
    await writer.flush_async()
    await writer.flush_async()
    assert not any(task.done() for task in waiting)
    assert writer.metrics.blocked >= 1
    with pytest.raises(SpoolFullError):
        writer.append(make_record(99_999))  # would overtake the waiting requests

    reader = SpoolReader(tmp_path)
    delivered = await reader.read(1000)
    assert len(delivered) == accepted
    await reader.commit_async(delivered[-1][0])
    assert await asyncio.wait_for(asyncio.gather(*waiting), timeout=30) == [True] * 3
    await writer.aclose()
    later = await reader.read(1000)
    assert ids(later) == [f"req-{accepted + i}" for i in range(3)]
    reader.close()


async def test_closing_fails_requests_still_waiting_for_space(tmp_path: Path) -> None:
    options = msgspec.structs.replace(FULL_FAIL_OPEN, when_full="block")
    writer = SpoolWriter(tmp_path, options)
    index = 0
    while has_room(writer, 200):
        await writer.append_wait(make_record(index))
        index += 1
    waiting = asyncio.create_task(writer.append_wait(make_record(index)))
    await writer.flush_async()
    await writer.aclose()
    with pytest.raises(Exception, match="closed"):
        await waiting


async def test_reader_tails_a_live_writer(tmp_path: Path) -> None:
    writer = SpoolWriter(tmp_path, SpoolOptions(flush_interval_s=0.005))
    reader = SpoolReader(tmp_path)
    assert await reader.read(10) == []
    for i in range(5):
        assert await writer.append_wait(make_record(i))
    got: list[str] = []
    while len(got) < 5:
        got += ids(await reader.read(10, wait_s=30, poll_interval_s=0.005))
    assert got == [f"req-{i}" for i in range(5)]
    await writer.aclose()
    reader.close()


async def test_cancelled_read_does_not_skip_records(tmp_path: Path, writer: SpoolWriter) -> None:
    for i in range(3):
        writer.append(make_record(i))
    writer.flush()
    reader = SpoolReader(tmp_path)
    reading = asyncio.create_task(reader.read(10))
    await asyncio.sleep(0)  # the read is under way in its thread
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    # Whatever the thread read is not lost: the next read returns it.
    assert ids(await reader.read(10)) == ["req-0", "req-1", "req-2"]
    reader.close()


def test_text_that_was_not_utf8_is_kept_escaped(tmp_path: Path, writer: SpoolWriter) -> None:
    # aiohttp hands undecodable header and target bytes over as lone surrogates; msgpack
    # cannot carry them, and the record must neither be lost nor fail the request.
    odd = msgspec.structs.replace(
        make_record(0),
        path="/a\udcffb",
        roles=("r\udc80",),
        traceparent="00-\udcfe-01",
        correlation={"x-run\udc81": "v\udc82"},
        sql="select '\udc83'",
    )
    assert writer.append(odd)
    assert writer.append(make_record(1))
    writer.flush()
    reader = SpoolReader(tmp_path)
    [(_, kept), (_, after)] = read_all(reader)
    reader.close()
    assert kept.path == "/a\\udcffb"
    assert kept.roles == ("r\\udc80",)
    assert kept.traceparent == "00-\\udcfe-01"
    assert kept.correlation == {"x-run\\udc81": "v\\udc82"}
    assert kept.sql == "select '\\udc83'"
    assert kept.request_id == odd.request_id
    assert after == make_record(1)


def frame_offsets(segment: Path) -> list[int]:
    """Where each frame of a segment starts."""
    data = segment.read_bytes()
    offsets, pos = [], SEGMENT_HEADER_BYTES
    while pos < len(data):
        offsets.append(pos)
        pos += 8 + int.from_bytes(data[pos : pos + 4], "little")
    return offsets


def spool_of(directory: Path, count: int, *, seal: bool = True) -> Path:
    writer = SpoolWriter(directory, MANUAL_FLUSH)
    for i in range(count):
        writer.append(make_record(i, sql="SELECT 1" * (i % 4)))
    writer.close()
    [segment] = segment_files(directory)
    if seal:
        SpoolWriter(directory, MANUAL_FLUSH).close()  # a newer segment: this one is complete
    return segment


def test_bit_flip_mid_segment_sets_aside_that_record_and_delivers_all_after_it(
    tmp_path: Path,
) -> None:
    segment = spool_of(tmp_path, 10)
    starts = frame_offsets(segment)
    data = bytearray(segment.read_bytes())
    data[starts[3] + 20] ^= 0x01
    segment.write_bytes(bytes(data))

    reader = SpoolReader(tmp_path)
    assert ids(read_all(reader)) == [f"req-{i}" for i in range(10) if i != 3]
    [(fields, raw)] = quarantined(tmp_path)
    assert (fields["segment"], fields["offset"]) == (1, starts[3])
    assert raw == bytes(data[starts[3] : starts[4]])
    assert "CRC mismatch" in str(fields["reason"])
    assert reader.metrics.records_quarantined == 1
    assert reader.metrics.torn_tails_skipped == 0
    reader.close()


def test_damaged_length_resynchronises_at_the_next_intact_frame(tmp_path: Path) -> None:
    segment = spool_of(tmp_path, 10)
    starts = frame_offsets(segment)
    data = bytearray(segment.read_bytes())
    data[starts[3] : starts[3] + 4] = (0xFFFF_FF00).to_bytes(4, "little")
    segment.write_bytes(bytes(data))

    reader = SpoolReader(tmp_path)
    assert ids(read_all(reader)) == [f"req-{i}" for i in range(10) if i != 3]
    [(fields, raw)] = quarantined(tmp_path)
    assert fields["offset"] == starts[3]
    assert raw == bytes(data[starts[3] : starts[4]])  # exactly the damaged frame
    reader.close()


def test_damage_in_the_newest_segment_is_set_aside_once_the_next_frame_is_intact(
    tmp_path: Path,
) -> None:
    segment = spool_of(tmp_path, 5, seal=False)
    starts = frame_offsets(segment)
    data = bytearray(segment.read_bytes())
    data[starts[2] + 30] ^= 0x80  # mid-segment: the frame after it verifies
    data[starts[4] + 30] ^= 0x80  # the last frame: nothing yet says it is not torn
    segment.write_bytes(bytes(data))

    reader = SpoolReader(tmp_path)
    assert ids(read_all(reader)) == ["req-0", "req-1", "req-3"]
    assert [fields["offset"] for fields, _raw in quarantined(tmp_path)] == [starts[2]]
    writer = SpoolWriter(tmp_path, MANUAL_FLUSH)  # seals it
    writer.append(make_record(5))
    writer.close()
    assert ids(read_all(reader)) == ["req-5"]
    assert [fields["offset"] for fields, _raw in quarantined(tmp_path)] == starts[2::2]
    reader.close()


def test_zeros_after_the_last_frame_are_a_torn_tail_not_records(tmp_path: Path) -> None:
    # A crash can leave a file's tail as zeros: they must not pass as empty frames.
    segment = spool_of(tmp_path, 3)
    with segment.open("ab") as handle:
        handle.write(bytes(4096))
    reader = SpoolReader(tmp_path)
    assert ids(read_all(reader)) == ["req-0", "req-1", "req-2"]
    assert quarantined(tmp_path) == []
    assert reader.metrics.torn_tails_skipped == 1
    assert reader.metrics.bytes_skipped == 4096
    reader.close()


def test_position_inside_a_frame_resumes_at_the_frame_end_before_it(tmp_path: Path) -> None:
    segment = spool_of(tmp_path, 5)
    starts = frame_offsets(segment)
    (tmp_path / "reader.position").write_text(
        f'{{"format": 1, "segment": 1, "offset": {starts[2] + 3}}}'
    )
    reader = SpoolReader(tmp_path)
    # req-0 and req-1 ended before the position; req-2 is read again, nothing skipped.
    assert reader.committed_position == SpoolPosition(1, starts[2])
    assert ids(read_all(reader)) == ["req-2", "req-3", "req-4"]
    assert quarantined(tmp_path) == []
    assert segment.exists()
    reader.close()


@pytest.mark.parametrize("length", [0xFFFF_FF00, 0x04], ids=["impossible", "shorter"])
def test_restart_after_a_damaged_length_resumes_at_the_commit_past_it(
    tmp_path: Path, length: int
) -> None:
    # The reader passed the damaged frame by resynchronising; a restart must find the
    # commit after it a frame end too, not go back before the damage and deliver again.
    segment = spool_of(tmp_path, 10)
    starts = frame_offsets(segment)
    data = bytearray(segment.read_bytes())
    data[starts[3] : starts[3] + 4] = length.to_bytes(4, "little")
    segment.write_bytes(bytes(data))
    reader = SpoolReader(tmp_path)
    delivered = read_all(reader)
    assert ids(delivered) == [f"req-{i}" for i in range(10) if i != 3]
    reader.commit(delivered[6][0])  # req-7, mid-segment: the segment stays
    reader.close()

    reader = SpoolReader(tmp_path)
    assert reader.committed_position == delivered[6][0]
    assert ids(read_all(reader)) == ["req-8", "req-9"]
    assert [fields["offset"] for fields, _raw in quarantined(tmp_path)] == [starts[3]]
    reader.close()


def test_position_past_the_end_of_its_segment_resumes_at_its_last_frame_end(
    tmp_path: Path,
) -> None:
    segment = spool_of(tmp_path, 3)
    # A hand-edited offset far past the file (reading that much would exhaust memory).
    (tmp_path / "reader.position").write_text(
        '{"format": 1, "segment": 1, "offset": 4611686018427387904}'
    )
    size = segment.stat().st_size
    reader = SpoolReader(tmp_path)
    assert reader.committed_position == SpoolPosition(1, size)
    assert read_all(reader) == []
    reader.close()
