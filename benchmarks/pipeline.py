"""End to end: spool -> agent -> Kafka (encrypted) -> ingester -> PostgreSQL, against direct.

Run: `python -m benchmarks.pipeline [--records N] [--duration S] [--rate EVENTS_PER_S]
[--latency-duration S]` (PostgreSQL and Kafka from `LS_PG_DSN` / `LS_KAFKA_BOOTSTRAP`, else
the `scripts/services` defaults).

The agent and the ingester run as real processes (`python -m agent.agent`,
`python -m agent.ingest`), as deployed; this process only writes the spool and watches
the store. Everything goes into a scratch database and a fresh topic, dropped afterwards.

1. Throughput, Kafka path: N capture records (ETL-like traffic: traces of 10 requests,
   so every request gives an access event and every trace a START and a COMPLETE) are
   spooled first; then agent and ingester start and the store's row count is sampled
   every second. Reported: events/s over the whole drain, and sustained events/s over
   the window between 10% and 90% of the rows (start-up and tail excluded).
2. Baseline in the same run, same records: the agent with `sink: direct` (no Kafka, no
   encryption, no ingester) into an emptied store.
3. Latency, Kafka path: records spooled at a fixed rate of events/s with their request
   time set to the moment they are spooled; one request in 20 is a probe whose access row
   is looked up by event id every 20 ms. Reported: p50/p90/p99/max of request time to
   row visible (the poll adds up to 20 ms).

The machine is shared and noisy: figures are for this run only; the direct baseline is
what to compare against.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import yaml
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agent.capture import CaptureRecord
from agent.derive import DeriveConfig, Deriver
from agent.derive.routes import DATASET_PREFIX
from agent.derive.runs import RunConfig
from agent.events import access_event_id
from agent.spool import SpoolOptions, SpoolWriter
from agent.store.migrate import migrate

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG = "postgresql://lineage:lineage@127.0.0.1:55432/lineage"
DEFAULT_KAFKA = "127.0.0.1:59092"
SERVICE = "https://warehouse.bench:8001"
END_HEADER = "x-run-end"
REQUESTS_PER_TRACE = 10
PROBE_EVERY = 20


def record(index: int, time_ns: int) -> CaptureRecord:
    """Request `index` of the ETL traffic: traces of 10, reads then writes, last one ends."""
    trace, step = divmod(index, REQUESTS_PER_TRACE)
    reading = step < REQUESTS_PER_TRACE // 2
    table = f"{'src' if reading else 'dst'}_{trace % 500}"
    return CaptureRecord(
        request_id=f"req-{index}",
        time_ns=time_ns,
        service=SERVICE,
        principal=f"etl-{trace % 7}",
        roles=("etl",),
        method="GET" if reading else "POST",
        path=f"/warehouse/{table}",
        route="datasets",
        resource=f"{DATASET_PREFIX}{table}",
        action="read" if reading else "write",
        decision="allow",
        rule="p, etl, dataset:*, *",
        status=200,
        bytes_out=4096,
        duration_us=800,
        traceparent=f"00-{trace + 1:032x}-{step + 1:016x}-01",
        correlation={END_HEADER: "end"} if step == REQUESTS_PER_TRACE - 1 else {},
    )


def events_per_record() -> float:
    deriver = Deriver(derive_config())
    now = time.time_ns()
    events = sum(len(deriver.feed(record(i, now + i))) for i in range(1000))
    return events / 1000


def derive_config() -> DeriveConfig:
    return DeriveConfig(runs=RunConfig(end_header=END_HEADER))


# ---- infrastructure ----------------------------------------------------------------------


@dataclass
class Setup:
    admin_dsn: str
    dsn: str
    database: str
    bootstrap: str
    topic: str
    work: Path
    # Producer compression; None keeps the configuration's default.
    compression: str | None = None


async def _execute(dsn: str, statement: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def create_store(admin_dsn: str) -> tuple[str, str]:
    name = f"lineage_bench_{secrets.token_hex(5)}"
    await _execute(admin_dsn, f'CREATE DATABASE "{name}"')
    dsn = urlunsplit(urlsplit(admin_dsn)._replace(path="/" + name))
    await migrate(dsn)
    return name, dsn


async def drop_store(admin_dsn: str, database: str, attempts: int = 30) -> None:
    """Drop the scratch database; retried, because an autovacuum worker the benchmark's
    writes woke may still be in it, and FORCE may not end a superuser's process."""
    for attempt in range(attempts):
        try:
            await _execute(admin_dsn, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            return
        except asyncpg.PostgresError as exc:
            if attempt == attempts - 1:
                print(f"warning: scratch database {database} left behind: {exc}", file=sys.stderr)
                return
            await asyncio.sleep(1.0)


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name=topic, num_partitions=partitions, replication_factor=1)]
        )
    finally:
        await admin.close()


async def delete_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()


async def stored_rows(connection: asyncpg.Connection) -> int:
    count: int = await connection.fetchval(
        "SELECT (SELECT count(*) FROM events_raw) + (SELECT count(*) FROM access_events)"
    )
    return count


def write_configs(setup: Setup, spool: Path, *, name: str, sink: str) -> tuple[Path, Path]:
    """Config files for the agent and the ingester of one phase."""
    common = {
        "kafka": {"bootstrap_servers": setup.bootstrap, "topic": setup.topic}
        | ({"compression": setup.compression} if setup.compression else {}),
        "keys": {"keyring": str(setup.work / "keyring.json")},
        "store": {"dsn": setup.dsn, "migrate": False},
    }
    agent = {
        **common,
        "agent": {
            "spool_dir": str(spool),
            "sink": sink,
            "max_batch_events": 5000,
            "linger": 0.1,
            "read_records": 5000,
            "admin_listen": "127.0.0.1:0",
        },
        "derive": {"runs": {"end_header": END_HEADER}},
    }
    ingest = {
        **common,
        "ingest": {
            "group_id": f"bench-{name}",
            "max_poll_records": 200,
            "admin_listen": "127.0.0.1:0",
        },
    }
    agent_path = setup.work / f"{name}-agent.yaml"
    ingest_path = setup.work / f"{name}-ingest.yaml"
    agent_path.write_text(yaml.safe_dump(agent))
    ingest_path.write_text(yaml.safe_dump(ingest))
    return agent_path, ingest_path


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def processes(*commands: list[str], log: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    with log.open("ab") as output:
        try:
            for command in commands:
                started.append(
                    subprocess.Popen(
                        command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT
                    )
                )
            yield started
        finally:
            for process in started:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in started:
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def agent_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "agent.agent", "--config", str(config)]


def ingest_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "agent.ingest", "--config", str(config)]


def spool_records(directory: Path, count: int) -> None:
    writer = SpoolWriter(directory, SpoolOptions(max_bytes=8 << 30, segment_bytes=64 << 20))
    try:
        now = time.time_ns()
        for index in range(count):
            writer.append(record(index, now + index))
        writer.flush()
    finally:
        writer.close()


# ---- phases ------------------------------------------------------------------------------


@dataclass
class Throughput:
    name: str
    rows: int
    seconds: float
    rows_per_s: float
    sustained_rows_per_s: float
    samples: list[tuple[float, int]]
    # CPU seconds used by each process of the phase ("agent.agent", "agent.ingest").
    cpu_seconds: dict[str, float] = dataclasses.field(default_factory=dict)


async def measure_drain(setup: Setup, name: str, expected: int, duration: float) -> Throughput:
    connection = await asyncpg.connect(setup.dsn)
    try:
        start = time.monotonic()
        samples: list[tuple[float, int]] = [(0.0, 0)]
        while time.monotonic() - start < duration + 60:
            await asyncio.sleep(1.0)
            rows = await stored_rows(connection)
            samples.append((time.monotonic() - start, rows))
            if rows >= expected or samples[-1][0] > duration:
                break
    finally:
        await connection.close()
    seconds, rows = samples[-1]
    first = next((s for s in samples if s[1] >= rows * 0.1), samples[0])
    last = next((s for s in samples if s[1] >= rows * 0.9), samples[-1])
    window = last[0] - first[0]
    sustained = (last[1] - first[1]) / window if window > 0 else 0.0
    return Throughput(name, rows, seconds, rows / seconds, sustained, samples)


async def throughput(setup: Setup, *, sink: str, records: int, duration: float) -> Throughput:
    await _execute(
        setup.dsn,
        "TRUNCATE lineage_edge_runs, lineage_edges, column_edges, run_datasets, runs, jobs, "
        "access_events, datasets, events_raw, dead_letter RESTART IDENTITY CASCADE",
    )
    spool = setup.work / f"spool-{sink}"
    spool_records(spool / "w0", records)
    expected = round(records * events_per_record())
    agent_config, ingest_config = write_configs(setup, spool, name=sink, sink=sink)
    commands = [agent_command(agent_config)]
    if sink == "kafka":
        commands.append(ingest_command(ingest_config))
    with processes(*commands, log=setup.work / f"{sink}.log") as started:
        result = await measure_drain(setup, f"{sink}", expected, duration)
        for command, process in zip(commands, started, strict=True):
            result.cpu_seconds[command[2]] = process_cpu_seconds(process.pid)
    return result


@dataclass
class Latency:
    rate: float
    seconds: float
    probes: int
    arrived: int
    p50: float
    p90: float
    p99: float
    max: float


async def latency(setup: Setup, *, rate: float, duration: float) -> Latency:
    spool = setup.work / "spool-latency"
    agent_config, ingest_config = write_configs(setup, spool, name="latency", sink="kafka")
    records_per_s = rate / events_per_record()
    writer = SpoolWriter(spool / "w0", SpoolOptions(max_bytes=8 << 30, segment_bytes=64 << 20))
    sent: dict[str, int] = {}  # probe access event id -> request time (ns)
    arrived: dict[str, int] = {}  # -> arrival time (ns)
    connection = await asyncpg.connect(setup.dsn)

    async def poll() -> None:
        while True:
            await asyncio.sleep(0.02)
            waiting = [key for key in sent if key not in arrived]
            if not waiting:
                continue
            rows = await connection.fetch(
                "SELECT event_id::text FROM access_events WHERE event_id = ANY($1::uuid[])",
                waiting,
            )
            now = time.time_ns()
            for row in rows:
                arrived.setdefault(row[0], now)

    with processes(
        agent_command(agent_config), ingest_command(ingest_config), log=setup.work / "latency.log"
    ):
        await asyncio.sleep(3.0)  # let both processes start and join the group
        poller = asyncio.create_task(poll(), name="latency-poll")
        start = time.monotonic()
        index = 0
        try:
            while (elapsed := time.monotonic() - start) < duration:
                due = int(elapsed * records_per_s)
                while index < due:
                    now = time.time_ns()
                    capture = record(index, now)
                    writer.append(capture)
                    if index % PROBE_EVERY == 0:
                        assert capture.resource is not None
                        key = access_event_id(
                            SERVICE,
                            capture.request_id,
                            SERVICE,
                            capture.resource[len(DATASET_PREFIX) :],
                            capture.action or "",
                        )
                        sent[str(key)] = now
                    index += 1
                await asyncio.sleep(0.005)
            # The last probes get up to 30 s to arrive; missing ones are reported.
            for _ in range(300):
                if len(arrived) >= len(sent):
                    break
                await asyncio.sleep(0.1)
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            writer.close()
            await connection.close()
    delays = sorted((arrived[k] - sent[k]) / 1e9 for k in arrived)
    if not delays:
        return Latency(rate, duration, len(sent), 0, *(float("nan"),) * 4)
    quantiles = statistics.quantiles(delays, n=100, method="inclusive")
    return Latency(
        rate,
        duration,
        len(sent),
        len(delays),
        quantiles[49],
        quantiles[89],
        quantiles[98],
        delays[-1],
    )


# ---- main --------------------------------------------------------------------------------


@dataclass
class Result:
    records: int
    events_per_record: float
    partitions: int
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]
    kafka: Throughput
    direct: Throughput
    latency: Latency


async def run(args: argparse.Namespace) -> Result:
    admin_dsn = os.environ.get("LS_PG_DSN", DEFAULT_PG)
    bootstrap = os.environ.get("LS_KAFKA_BOOTSTRAP", DEFAULT_KAFKA)
    database, dsn = await create_store(admin_dsn)
    topic = f"lineage-bench-{secrets.token_hex(4)}"
    await create_topic(bootstrap, topic, args.partitions)
    try:
        with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as work:
            setup = Setup(admin_dsn, dsn, database, bootstrap, topic, Path(work), args.compression)
            load_before = os.getloadavg()
            kafka = await throughput(
                setup, sink="kafka", records=args.records, duration=args.duration
            )
            direct = await throughput(
                setup, sink="direct", records=args.records, duration=args.duration
            )
            lat = await latency(setup, rate=args.rate, duration=args.latency_duration)
            load_after = os.getloadavg()
            for name in ("kafka.log", "direct.log", "latency.log"):
                text = (Path(work) / name).read_text(errors="replace")
                errors = [line for line in text.splitlines() if " ERROR " in line]
                if errors:
                    print(f"{name}: {len(errors)} error lines, first: {errors[0]}")
    finally:
        await drop_store(admin_dsn, database)
        with contextlib.suppress(Exception):
            await delete_topic(bootstrap, topic)
    return Result(
        records=args.records,
        events_per_record=events_per_record(),
        partitions=args.partitions,
        loadavg_before=load_before,
        loadavg_after=load_after,
        kafka=kafka,
        direct=direct,
        latency=lat,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=300_000, help="records spooled per phase")
    parser.add_argument("--duration", type=float, default=30.0, help="longest drain measured (s)")
    parser.add_argument("--rate", type=float, default=5000.0, help="latency phase events/s")
    parser.add_argument("--latency-duration", type=float, default=20.0)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--compression",
        choices=["gzip", "none"],
        help="Kafka producer compression (default: the configuration's default, none)",
    )
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"pipeline-{stamp}.json").write_text(
        json.dumps(dataclasses.asdict(result), indent=2)
    )
    print(
        f"pipeline benchmark: {result.records} records per phase "
        f"({result.events_per_record:.2f} events each), {result.partitions} partitions, "
        f"{os.cpu_count()} CPUs, load {result.loadavg_before} -> {result.loadavg_after}"
    )
    print(f"{'path':<40}{'rows':>10}{'seconds':>9}{'events/s':>11}{'sustained/s':>13}")
    for label, entry in (
        ("kafka: agent->Kafka->ingester (sealed)", result.kafka),
        ("direct: agent->PostgreSQL (baseline)", result.direct),
    ):
        cpu = ", ".join(f"{name} {seconds:.1f}" for name, seconds in entry.cpu_seconds.items())
        print(
            f"{label:<40}{entry.rows:>10}{entry.seconds:>9.1f}"
            f"{entry.rows_per_s:>11,.0f}{entry.sustained_rows_per_s:>13,.0f}   CPU s: {cpu}"
        )
    lat = result.latency
    print(
        f"latency at {lat.rate:,.0f} events/s over {lat.seconds:.0f} s (kafka path): "
        f"{lat.arrived}/{lat.probes} probes arrived, p50 {lat.p50:.3f} s, p90 {lat.p90:.3f} s, "
        f"p99 {lat.p99:.3f} s, max {lat.max:.3f} s"
    )


if __name__ == "__main__":
    main()
