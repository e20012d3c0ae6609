"""Dropping a scratch database (tests, benchmarks) on a server shared with others.

`DROP DATABASE ... WITH (FORCE)` refuses when a backend it may not signal is connected, and
an autovacuum worker started by our own bulk load is one; a plain `DROP DATABASE` stops
autovacuum workers itself but fails while a client is still connected. Try plain first,
then forced, a few times.
"""

from __future__ import annotations

import asyncio

import asyncpg

__all__ = ["drop_scratch_database"]

_ATTEMPTS = 5


async def drop_scratch_database(connection: asyncpg.Connection, name: str) -> None:
    """Drop database `name` (an identifier this process generated, never user input)."""
    quoted = '"' + name.replace('"', '""') + '"'
    for attempt in range(_ATTEMPTS):
        for statement in (
            f"DROP DATABASE IF EXISTS {quoted}",
            f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)",
        ):
            try:
                await connection.execute(statement)
                return
            except (asyncpg.ObjectInUseError, asyncpg.InsufficientPrivilegeError):
                if attempt == _ATTEMPTS - 1 and "FORCE" in statement:
                    raise
        await asyncio.sleep(0.2 * (attempt + 1))
