"""The agent's event loop stays free while records are derived.

Deriving one read of records can take seconds (thousands of records, or one large SQL
text to parse). Done on the loop, that time would stall the admin listener, whose
`/healthz` a liveness probe reads, and the sink's connections.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from agent.agent import LineageAgent
from agent.capture import CaptureRecord
from agent.config import AgentConfig, AgentProcessConfig
from agent.derive import Deriver
from agent.events import LineageEvent
from tests.integration.agent.harness import write_spool
from tests.unit.agent.factories import make_record
from tests.unit.agent.test_metrics import DERIVE, ListSink

# A safety net against a deadlock, not a timing requirement.
PATIENCE_S = 30.0


class GatedDeriver(Deriver):
    """Derives as usual, but its first record waits until the test lets it go."""

    def __init__(self) -> None:
        super().__init__(DERIVE)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.loop_ran_meanwhile = False

    def feed(self, record: CaptureRecord) -> list[LineageEvent]:
        if not self.entered.is_set():
            self.entered.set()
            # Set from a coroutine: if this ran on the loop, that coroutine could not run.
            self.loop_ran_meanwhile = self.release.wait(PATIENCE_S)
        return super().feed(record)


async def test_the_loop_serves_others_while_a_read_is_being_derived(tmp_path: Path) -> None:
    now = time.time_ns()
    records = [
        make_record(f"r{index}", time_ns=now + index, path="/sales/t", resource="dataset:sales.t")
        for index in range(5)
    ]
    write_spool(tmp_path / "w0", records)
    config = AgentProcessConfig(
        agent=AgentConfig(
            spool_dir=str(tmp_path), poll_interval=0.01, linger=0.01, tick_interval=0.05
        ),
        derive=DERIVE,
    )
    sink = ListSink()
    agent = LineageAgent(config, sink)
    deriver = GatedDeriver()
    agent._deriver = deriver
    task = asyncio.create_task(agent.run(), name="test-agent")
    try:
        assert await asyncio.to_thread(deriver.entered.wait, PATIENCE_S)
        # The agent is inside a derivation now; this coroutine runs all the same.
        assert agent.stats().records_read == 0
        deriver.release.set()
        for _ in range(3000):
            if agent.stats().events_sent == len(records):
                break
            await asyncio.sleep(0.01)
    finally:
        deriver.release.set()
        agent.stop()
        await task
    assert deriver.loop_ran_meanwhile
    stats = agent.stats()
    assert (stats.records_read, stats.records_failed, stats.events_sent) == (5, 0, 5)
