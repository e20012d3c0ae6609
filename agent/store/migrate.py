"""Versioned schema migrations for the lineage store.

Migrations are the files `agent/store/migrations/NNN_name.sql`, applied in version order,
each in its own transaction together with its row in `schema_migrations`. A session-level
PostgreSQL advisory lock is held for the whole run, so ingesters that start together apply
each migration exactly once: the second waits, then finds nothing left to do.

Promises: `migrate(dsn)` is idempotent; a migration file edited after it was applied, or a
database that has a migration this code does not know, stops with a `MigrationError` that
says which one, before anything is applied.

Command line: `python -m agent.store.migrate [--dsn DSN]` (default: `$LS_PG_DSN`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import sys
from dataclasses import dataclass
from importlib import resources

import asyncpg

__all__ = ["Migration", "MigrationError", "available_migrations", "main", "migrate"]

# Arbitrary, fixed: every process that migrates this schema must use the same key.
MIGRATION_LOCK_KEY = 7160514411023985200
_FILE_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")

_CREATE_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The schema cannot be brought to this code's version; the message says why."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def file_name(self) -> str:
        return f"{self.version:03d}_{self.name}.sql"

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def available_migrations() -> list[Migration]:
    """The migrations shipped with this code, in version order."""
    found: dict[int, Migration] = {}
    for entry in resources.files("agent.store.migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migration files have version {version:03d}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def pending(applied: dict[int, str], shipped: list[Migration]) -> list[Migration]:
    """The shipped migrations not yet applied, after checking the applied ones still match.

    `applied` maps version to the checksum recorded when it was applied.
    """
    by_version = {m.version: m for m in shipped}
    for version in sorted(applied):
        migration = by_version.get(version)
        if migration is None:
            raise MigrationError(
                f"the database has migration {version:03d} applied, which this code does not "
                "ship; it was migrated by a newer version"
            )
        if migration.checksum != applied[version]:
            raise MigrationError(
                f"migration {migration.file_name} was changed after it was applied "
                f"(recorded checksum {applied[version][:12]}, file {migration.checksum[:12]}); "
                "add a new migration instead of editing an applied one"
            )
    return [m for m in shipped if m.version not in applied]


async def migrate_connection(
    connection: asyncpg.Connection, shipped: list[Migration] | None = None
) -> list[str]:
    """Apply the pending migrations on an open connection; returns the files applied."""
    migrations = available_migrations() if shipped is None else shipped
    await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await connection.execute(_CREATE_BOOKKEEPING)
        rows = await connection.fetch("SELECT version, checksum FROM schema_migrations")
        todo = pending({r["version"]: r["checksum"] for r in rows}, migrations)
        for migration in todo:
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
        return [m.file_name for m in todo]
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def migrate(dsn: str) -> list[str]:
    """Bring the database at `dsn` to this code's schema; returns the files applied."""
    connection = await asyncpg.connect(dsn)
    try:
        return await migrate_connection(connection)
    finally:
        await connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.store.migrate",
        description="Apply the lineage store's schema migrations.",
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("LS_PG_DSN"),
        help="PostgreSQL DSN (default: $LS_PG_DSN)",
    )
    args = parser.parse_args(argv)
    if not args.dsn:
        print("migrate: no DSN: pass --dsn or set LS_PG_DSN", file=sys.stderr)
        return 2
    try:
        applied = asyncio.run(migrate(args.dsn))
    except MigrationError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"migrate: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if applied:
        print("applied: " + ", ".join(applied))
    else:
        print("schema is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
