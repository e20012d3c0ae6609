"""Schema migrations against the real PostgreSQL, each test on its own empty database."""

from __future__ import annotations

import asyncio
import dataclasses

import asyncpg
import pytest

from agent.store.migrate import (
    MigrationError,
    available_migrations,
    main,
    migrate,
    migrate_connection,
)

SHIPPED = [m.file_name for m in available_migrations()]


async def applied_rows(dsn: str) -> list[tuple[int, str, str]]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
        )
        return [(r["version"], r["name"], r["checksum"]) for r in rows]
    finally:
        await connection.close()


def test_migrations_are_numbered_from_001_without_gaps() -> None:
    versions = [m.version for m in available_migrations()]
    assert versions == list(range(1, len(versions) + 1))
    assert SHIPPED[0] == "001_init.sql"


async def test_migrate_applies_everything_once_then_is_a_no_op(empty_dsn: str) -> None:
    assert await migrate(empty_dsn) == SHIPPED
    first = await applied_rows(empty_dsn)
    assert await migrate(empty_dsn) == []
    assert await applied_rows(empty_dsn) == first
    assert [(v, c) for v, _, c in first] == [
        (m.version, m.checksum) for m in available_migrations()
    ]


async def test_two_migrators_starting_together_apply_each_migration_once(empty_dsn: str) -> None:
    results = await asyncio.gather(migrate(empty_dsn), migrate(empty_dsn), migrate(empty_dsn))
    assert sorted(results, key=len) == [[], [], SHIPPED]
    assert len(await applied_rows(empty_dsn)) == len(SHIPPED)


async def test_a_migration_edited_after_it_was_applied_is_refused(empty_dsn: str) -> None:
    await migrate(empty_dsn)
    original = available_migrations()
    edited = [dataclasses.replace(original[0], sql=original[0].sql + "\n-- tweak\n"), *original[1:]]
    connection = await asyncpg.connect(empty_dsn)
    try:
        with pytest.raises(MigrationError, match=r"001_init\.sql was changed after it was applied"):
            await migrate_connection(connection, edited)
        # The lock was released: a correct migrator still gets through.
        assert await migrate_connection(connection) == []
    finally:
        await connection.close()


async def test_a_database_from_newer_code_is_refused(empty_dsn: str) -> None:
    await migrate(empty_dsn)
    connection = await asyncpg.connect(empty_dsn)
    try:
        await connection.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')"
        )
        with pytest.raises(MigrationError, match="migration 999 applied"):
            await migrate_connection(connection)
    finally:
        await connection.close()


async def test_a_failing_migration_leaves_nothing_behind(empty_dsn: str) -> None:
    shipped = available_migrations()
    broken = dataclasses.replace(
        shipped[-1],
        version=shipped[-1].version + 1,
        name="broken",
        sql="CREATE TABLE t (a int); SELECT 1/0;",
    )
    connection = await asyncpg.connect(empty_dsn)
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate_connection(connection, [*shipped, broken])
        assert len(await applied_rows(empty_dsn)) == len(shipped)
        assert await connection.fetchval("SELECT to_regclass('t')") is None
    finally:
        await connection.close()


async def test_cli_migrates_and_reports(empty_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    # main() runs its own event loop, so run it off this test's loop.
    assert await asyncio.to_thread(main, ["--dsn", empty_dsn]) == 0
    assert "001_init.sql" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["--dsn", empty_dsn]) == 0
    assert "up to date" in capsys.readouterr().out


def test_cli_with_an_unreachable_database_fails_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--dsn", "postgresql://nobody:x@127.0.0.1:1/none"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("migrate: ")
    assert "\n" not in err


def test_cli_without_a_dsn_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LS_PG_DSN", raising=False)
    assert main([]) == 2
    assert "LS_PG_DSN" in capsys.readouterr().err
