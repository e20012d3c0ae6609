"""Running an agent-side service (agent, ingester) as a process until SIGTERM or SIGINT.

One place for what `lineage-sidecar agent|ingest` and `python -m agent.agent|ingest` share:
the store DSN given inline or by reference, logging to stderr, and start-up failures an
operator fixes (a DSN or key reference that does not resolve, a store or Vault that
refuses the connection, an admin listener address in use) ending in one line and exit
status 1 instead of a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from agent.admin import AdminListenError
from agent.config import load_file
from agent.keys import KeyProviderError, resolve_secret_reference
from agent.sink import SinkError
from agent.store.writer import StoreError

ProcessConfig = TypeVar("ProcessConfig")


def resolve_dsn(value: str) -> str:
    """A DSN given inline or as a `file:` / `env:` reference."""
    if value.startswith(("file:", "env:")):
        return resolve_secret_reference(value)
    return value


def serve(service: Coroutine[Any, Any, None], *, prog: str) -> int:
    """Run `service` to its end; 0 when it stopped, 1 when it could not start."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(service)
    except (KeyProviderError, StoreError, SinkError, AdminListenError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0


def module_main(
    argv: list[str] | None,
    *,
    prog: str,
    description: str | None,
    kind: type[ProcessConfig],
    run: Callable[[ProcessConfig], Coroutine[Any, Any, None]],
) -> int:
    """`python -m agent.agent|ingest --config FILE`: 2 for a bad file, else as `serve`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help=f"YAML file ({kind.__name__})")
    arguments = parser.parse_args(argv)
    try:
        config = load_file(arguments.config, kind)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve(run(config), prog=prog)
