"""The access log writes every entry, whatever bytes the client sent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from proxy.accesslog import AccessLog


def test_bytes_that_were_not_utf8_are_written_escaped(tmp_path: Path) -> None:
    # aiohttp hands undecodable target and header bytes over as lone surrogates. Before
    # they were escaped here, the encode raised in the writer and ended the log's task.
    path = tmp_path / "access.jsonl"
    drops: list[int] = []
    log = AccessLog(str(path), 10, lambda: drops.append(1))
    log.record(("r1", 1.7e9, "127.0.0.1", "GET", "/a\udcffb", 200, 5, 0.001, "ua\udc80"))
    log.record(("r2", 1.7e9, "127.0.0.1", "GET", "/plain", 404, 0, 0.002, None))
    asyncio.run(log.flush())
    log.close()
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert (first["request_id"], first["path"], first["user_agent"]) == (
        "r1",
        "/a\\udcffb",
        "ua\\udc80",
    )
    assert (second["request_id"], second["path"], second["status"]) == ("r2", "/plain", 404)
    assert drops == []
