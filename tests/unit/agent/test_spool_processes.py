"""Spool across processes: a writer process and a reader process on one directory."""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import time
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

from agent.capture import CaptureRecord
from agent.spool import SpoolOptions, SpoolReader, SpoolWriter

RECORDS = 4000
OPTIONS = SpoolOptions(
    segment_bytes=32 << 10,
    max_bytes=1 << 20,
    max_record_bytes=4096,
    flush_interval_s=0.002,
    flush_bytes=16 << 10,
    when_full="fail_open",
)


def write_records(directory: str, count: int) -> None:
    """Runs in a child process: the proxy side."""
    writer = SpoolWriter(directory, OPTIONS)
    for index in range(count):
        record = CaptureRecord(
            request_id=f"req-{index}",
            time_ns=index,
            service="https://svc.internal",
            method="GET",
            path=f"/items/{index}",
            status=200,
        )
        while not writer.append(record):  # full: let the reader catch up, never lose one
            time.sleep(0.001)
        if index % 500 == 0:
            time.sleep(0.01)  # give the reader a chance to tail a live segment
    writer.close()


def test_writer_and_reader_processes_deliver_every_record_in_order(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    writer = context.Process(target=write_records, args=(str(tmp_path), RECORDS))
    writer.start()
    try:
        delivered: list[str] = []
        reader = SpoolReader(tmp_path)
        restarted = False
        deadline = time.monotonic() + 120
        while len(delivered) < RECORDS and time.monotonic() < deadline:
            batch = reader.read_batch(300)
            if not batch:
                assert writer.is_alive() or writer.exitcode == 0, "the writer process failed"
                time.sleep(0.005)
                continue
            delivered += [record.request_id for _position, record in batch]
            reader.commit(batch[-1][0])
            if not restarted and len(delivered) > RECORDS // 2:
                reader.close()  # the agent restarts half way
                reader = SpoolReader(tmp_path)
                restarted = True
        writer.join(timeout=60)
        assert writer.exitcode == 0
        assert delivered == [f"req-{i}" for i in range(RECORDS)]
        assert reader.read_batch() == []
        assert len(list(tmp_path.glob("*.seg"))) == 1  # all but the newest deleted
        assert reader.metrics.segments_deleted > 0
        reader.close()
    finally:
        if writer.is_alive():
            writer.kill()
            writer.join()


def write_until_killed(directory: str, flushed: Synchronized[int]) -> None:
    """Runs in a child process: a proxy that appends until it is killed with SIGKILL."""
    writer = SpoolWriter(directory, OPTIONS)
    index = 0
    while True:
        record = CaptureRecord(
            request_id=f"req-{index}",
            time_ns=index,
            service="https://svc.internal",
            method="GET",
            path=f"/items/{index}",
            status=200,
        )
        if writer.append(record):
            index += 1
        if index % 50 == 0:
            writer.flush()
            flushed.value = index


def test_proxy_killed_mid_write_loses_nothing_it_flushed(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    flushed = context.Value("q", 0)
    proxy = context.Process(target=write_until_killed, args=(str(tmp_path), flushed))
    proxy.start()
    try:
        deadline = time.monotonic() + 60
        while flushed.value < 3000 and time.monotonic() < deadline and proxy.is_alive():
            time.sleep(0.01)
        os.kill(proxy.pid or 0, signal.SIGKILL)
        proxy.join()
        durable = flushed.value
        assert durable >= 3000

        reader = SpoolReader(tmp_path)
        delivered: list[str] = []
        while batch := reader.read_batch(1000):  # drain and deliver as the agent would
            delivered += [record.request_id for _position, record in batch]
            reader.commit(batch[-1][0])

        restarted = SpoolWriter(tmp_path, OPTIONS)  # the proxy comes back
        for index in range(3):
            restarted.append(
                CaptureRecord(
                    request_id=f"after-{index}",
                    time_ns=index,
                    service="https://svc.internal",
                    method="GET",
                    path="/after",
                    status=200,
                )
            )
        restarted.close()
        while batch := reader.read_batch(1000):
            delivered += [record.request_id for _position, record in batch]
            reader.commit(batch[-1][0])
        reader.close()

        before_kill = delivered[:-3]
        # Everything flushed before the kill, in order, nothing twice; maybe a few more.
        assert len(before_kill) >= durable
        assert before_kill == [f"req-{i}" for i in range(len(before_kill))]
        assert delivered[-3:] == ["after-0", "after-1", "after-2"]
    finally:
        if proxy.is_alive():
            proxy.kill()
            proxy.join()


def write_against_a_file_size_limit(directory: str, count: int, errors: Synchronized[int]) -> None:
    """Runs in a child process whose files cannot grow past 40 KiB: writes fail midway."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a dead process
    _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40 << 10, hard))
    writer = SpoolWriter(
        directory,
        SpoolOptions(
            segment_bytes=64 << 10,
            max_bytes=8 << 20,
            max_record_bytes=4096,
            flush_interval_s=0.001,
            flush_bytes=1 << 30,
        ),
    )
    for index in range(count):
        writer.append(
            CaptureRecord(
                request_id=f"req-{index}",
                time_ns=index,
                service="https://svc.internal",
                method="GET",
                path=f"/items/{index}",
                status=200,
            )
        )
        if index % 20 == 0:
            writer.flush()
    writer.close()
    errors.value = writer.metrics.write_errors


def test_failed_writes_are_retried_in_a_new_segment_without_loss(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    errors = context.Value("q", 0)
    count = 1500
    proxy = context.Process(
        target=write_against_a_file_size_limit, args=(str(tmp_path), count, errors)
    )
    proxy.start()
    proxy.join(timeout=60)
    assert proxy.exitcode == 0
    assert errors.value > 0  # the limit was hit: this exercised the failure path

    reader = SpoolReader(tmp_path)
    delivered: list[str] = []
    while batch := reader.read_batch(1000):
        delivered += [record.request_id for _position, record in batch]
    reader.close()
    # At least once and in order: a batch cut by the failure may repeat, nothing is lost.
    first_seen = list(dict.fromkeys(delivered))
    assert first_seen == [f"req-{i}" for i in range(count)]
