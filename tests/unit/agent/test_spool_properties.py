"""Spool properties: any interleaving of appends, flushes, reads, commits and restarts
delivers every record at least once and in order, and nothing twice after the final
commit; hostile bytes in a segment never crash the frame scanner; one damaged frame
anywhere but the tail is set aside and costs no other record, and a restart after any
commit resumes exactly there."""

from __future__ import annotations

import tempfile
import zlib
from pathlib import Path

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.capture import CaptureRecord
from agent.spool import (
    FRAME_HEADER_BYTES,
    QUARANTINE_DIR,
    SEGMENT_HEADER_BYTES,
    SpoolOptions,
    SpoolPosition,
    SpoolReader,
    SpoolWriter,
    decode_quarantined,
    encode_frame,
    scan_frames,
)

OPTIONS = SpoolOptions(
    segment_bytes=2048,
    max_bytes=1 << 24,
    max_record_bytes=512,
    flush_interval_s=3600,  # only explicit flushes, closes and restarts write
    flush_bytes=1 << 30,
)

# Large enough that a test's records share one segment.
OPTIONS_ONE_SEGMENT = msgspec.structs.replace(OPTIONS, segment_bytes=1 << 20, max_record_bytes=4096)

Step = tuple[str, int]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 25)),
        st.tuples(st.just("flush"), st.just(0)),
        st.tuples(st.just("read"), st.integers(1, 40)),
        st.tuples(st.just("commit"), st.just(0)),
        st.tuples(st.just("restart_reader"), st.just(0)),
        st.tuples(st.just("restart_writer"), st.just(0)),
    ),
    max_size=30,
)


def record(index: int) -> CaptureRecord:
    return CaptureRecord(
        request_id=f"req-{index}",
        time_ns=index,
        service="https://svc.internal",
        method="POST",
        path=f"/t/{index}",
        status=201,
    )


@settings(max_examples=40, deadline=None)
@given(steps)
def test_every_record_delivered_in_order_and_once_after_final_commit(
    plan: list[Step],
) -> None:
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        writer = SpoolWriter(directory, OPTIONS)
        reader = SpoolReader(directory)
        appended = 0  # records handed to the writer
        visible = 0  # records the writer has written (flushed)
        next_unread = 0  # model of the reader's in-memory position
        committed = 0
        last_read: SpoolPosition | None = None
        try:
            for action, amount in plan:
                if action == "append":
                    for index in range(appended, appended + amount):
                        assert writer.append(record(index))
                    appended += amount
                elif action == "flush":
                    writer.flush()
                    visible = appended
                elif action == "read":
                    batch = reader.read_batch(amount)
                    expected = list(range(next_unread, min(next_unread + amount, visible)))
                    assert [r.request_id for _p, r in batch] == [f"req-{i}" for i in expected]
                    next_unread += len(batch)
                    if batch:
                        last_read = batch[-1][0]
                elif action == "commit" and last_read is not None:
                    reader.commit(last_read)
                    committed = next_unread
                elif action == "restart_reader":
                    reader.close()
                    reader = SpoolReader(directory)
                    next_unread, last_read = committed, None
                elif action == "restart_writer":
                    writer.close()
                    visible = appended
                    writer = SpoolWriter(directory, OPTIONS)
            writer.close()
            rest: list[str] = []
            while batch := reader.read_batch(50):
                rest += [r.request_id for _p, r in batch]
                last_read = batch[-1][0]
            assert rest == [f"req-{i}" for i in range(next_unread, appended)]
            if last_read is not None:
                reader.commit(last_read)
            reader.close()
            reader = SpoolReader(directory)
            assert reader.read_batch(1000) == []
            assert len(list(directory.glob("*.seg"))) == 1
        finally:
            writer.close()
            reader.close()


@settings(max_examples=300, deadline=None)
# Payloads are never empty: a capture record is a msgpack map, and an empty frame (zeros
# a crash left behind) is not taken for one.
@given(st.binary(max_size=600), st.lists(st.binary(min_size=1, max_size=64), max_size=5))
def test_scanner_returns_only_intact_frames_from_hostile_bytes(
    noise: bytes, payloads: list[bytes]
) -> None:
    data = b"".join(encode_frame(p) for p in payloads) + noise
    scan = scan_frames(data, max_record_bytes=256, max_frames=100)
    # Every frame before the noise comes back unchanged...
    assert [bytes(p) for _end, p in scan.frames[: len(payloads)]] == payloads
    # ...and anything returned passed its CRC and lies inside the buffer.
    for end, payload in scan.frames:
        header_at = end - len(payload) - FRAME_HEADER_BYTES
        crc = int.from_bytes(data[header_at + 4 : header_at + 8], "little")
        assert zlib.crc32(payload) == crc
        assert end <= len(data)
    assert scan.consumed <= len(data)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.text(max_size=300), min_size=2, max_size=25),
    st.data(),
    st.sampled_from(["payload", "crc", "length"]),
    st.booleans(),
)
def test_one_damaged_frame_is_set_aside_and_every_other_record_delivered_once(
    texts: list[str], data: st.DataObject, damage: str, sealed: bool
) -> None:
    records = [
        msgspec.structs.replace(record(index), path=f"/t/{text}")
        for index, text in enumerate(texts)
    ]
    victim = data.draw(st.integers(0, len(records) - 2), label="victim")  # not the tail
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        writer = SpoolWriter(directory, OPTIONS_ONE_SEGMENT)
        for item in records:
            assert writer.append(item)
        writer.close()
        [segment] = directory.glob("*.seg")
        spool = bytearray(segment.read_bytes())
        starts = [SEGMENT_HEADER_BYTES]
        while starts[-1] < len(spool):
            starts.append(
                starts[-1]
                + FRAME_HEADER_BYTES
                + int.from_bytes(spool[starts[-1] : starts[-1] + 4], "little")
            )
        at, end = starts[victim], starts[victim + 1]
        if damage == "payload":
            spool[data.draw(st.integers(at + FRAME_HEADER_BYTES, end - 1), label="byte")] ^= 0x10
        elif damage == "crc":
            spool[data.draw(st.integers(at + 4, at + 7), label="byte")] ^= 0x01
        else:
            # A length no record can have: found again only by resynchronising, which
            # waits for the segment to be sealed.
            spool[at + 3] ^= data.draw(st.integers(1, 255), label="high byte")
            sealed = True
        segment.write_bytes(bytes(spool))
        if sealed:
            SpoolWriter(directory, OPTIONS_ONE_SEGMENT).close()

        reader = SpoolReader(directory)
        try:
            delivered = []
            while batch := reader.read_batch(7):
                delivered += [r.request_id for _p, r in batch]
                reader.commit(batch[-1][0])
                reader.close()
                reader = SpoolReader(directory)  # a restart resumes exactly at the commit
                assert reader.committed_position == batch[-1][0]
            reader.close()
            reader = SpoolReader(directory)  # a restart delivers nothing again
            assert reader.read_batch(1000) == []
        finally:
            reader.close()
        assert delivered == [r.request_id for i, r in enumerate(records) if i != victim]
        entries = [
            decode_quarantined(path.read_bytes())
            for path in (directory / QUARANTINE_DIR).glob("*.json")
        ]
        assert [(fields["offset"], raw) for fields, raw in entries] == [(at, bytes(spool[at:end]))]
