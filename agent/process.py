"""Running an agent-side service (agent, ingester) as a process until SIGTERM or SIGINT.

One place for what `lineage-sidecar agent|ingest` and `python -m agent.agent|ingest` share:
logging to stderr, and start-up failures an operator fixes (a DSN or key reference that
does not resolve, a store or Vault that refuses the connection) ending in one line and
exit status 1 instead of a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from agent.keys import KeyProviderError
from agent.sink import SinkError
from agent.store.writer import StoreError


def serve(service: Coroutine[Any, Any, None], *, prog: str) -> int:
    """Run `service` to its end; 0 when it stopped, 1 when it could not start."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(service)
    except (KeyProviderError, StoreError, SinkError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0
